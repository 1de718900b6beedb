"""The Sort-of-CLEVR generator: deterministic, correct (answers recomputed here from each stored scene, scenes checked
against the pixels), balanced, and written atomically."""
import collections
import json
import math

import pytest
from PIL import Image

from nanovoco.repro import synthetic
from nanovoco.repro.synthetic import ANSWERS, PALETTE, QUESTION_SETS, generate

N_IMAGES, PER_IMAGE = 300, 7
# each question set as the repro asks it (layout: 3 objects on 64 x 64) and in other shapes
SETS = {"objects": dict(question_set="objects"), "layout": dict(question_set="layout", n_objects=3, image_size=64),
        "layout, 4 objects": dict(question_set="layout", n_objects=4, image_size=112),
        "graded, 1 to 8 objects": dict(question_set="graded", n_objects=(1, 8), image_size=64),
        "objects, 1 to 8 objects": dict(question_set="objects", n_objects=(1, 8))}


@pytest.fixture(scope="module", params=list(SETS))
def big(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("soc")
    kw = SETS[request.param]
    return out, json.loads(generate(out, N_IMAGES, PER_IMAGE, seed=0, **kw).read_text()), kw


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c, short = (files(generate(tmp_path / name, 6, 3, seed=seed).parent)
                      for name, seed in [("a", 1), ("b", 1), ("c", 2), ("short", 1)])
    assert a == b
    assert a["data.json"] != c["data.json"]
    assert all(a[name] != c[name] for name in a if name.endswith(".png"))
    # image i depends on (seed, i) only: a shorter run is a prefix of a longer one
    assert all(short[name] == a[name] for name in short if name.endswith(".png"))


def test_records_are_llava_records(big):
    out, records, kw = big
    assert len(records) == N_IMAGES * PER_IMAGE
    assert len({r["id"] for r in records}) == len(records)
    lo, hi = synthetic.object_counts(kw.get("n_objects", 6))
    for r in records[:50]:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].count("<image>") == 1
        assert gpt["from"] == "gpt" and gpt["value"] in ANSWERS
        assert (out / r["image"]).is_file() and r["type"] in QUESTION_SETS[kw["question_set"]]
        assert lo <= len(r["scene"]) <= hi and len({o["color"] for o in r["scene"]}) == len(r["scene"])
    counts = collections.Counter(len(r["scene"]) for r in records[::PER_IMAGE])
    assert set(counts) == set(range(lo, hi + 1))  # a range: every count drawn, about equally often
    assert max(counts.values()) <= 2 * min(counts.values())


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")


def expected_layout(qtype, scene, size):
    """A layout question's answer from the scene's pixel coordinates: the halves split the image at size / 2, the
    centre is the square from size / 4 to 3 size / 4 (the middle 2 x 2 cells of the 4 x 4 grid)."""
    left = [o for o in scene if 2 * o["x"] < size]
    top = [o for o in scene if 2 * o["y"] < size]
    if qtype == "left_right":
        assert 2 * len(left) != len(scene), "a tie was asked"
        return "left" if 2 * len(left) > len(scene) else "right"
    if qtype == "top_bottom":
        assert 2 * len(top) != len(scene), "a tie was asked"
        return "top" if 2 * len(top) > len(scene) else "bottom"
    if qtype == "count_left":
        return WORDS[len(left)]
    if qtype == "count_top":
        return WORDS[len(top)]
    if qtype == "centre":
        return "yes" if any(size / 4 < o["x"] < 3 * size / 4 and size / 4 < o["y"] < 3 * size / 4
                            for o in scene) else "no"
    quarters = {f"{v} {h}": sum((o in top) == (v == "top") and (o in left) == (h == "left") for o in scene)
                for v in ("top", "bottom") for h in ("left", "right")}
    if qtype == "empty_quarters":
        return WORDS[list(quarters.values()).count(0)]
    if qtype == "busiest_quarter":
        busiest = [q for q, n in quarters.items() if n == max(quarters.values())]
        assert len(busiest) == 1, "asked with a tie for the most objects"
        return busiest[0]
    assert qtype == "empty_quarter"
    empty = [q for q, n in quarters.items() if n == 0]
    assert len(empty) == 1, "asked with more than one quarter empty"
    return empty[0]


def expected_answer(record, size):
    """The answer, recomputed from the question text and the stored scene (independently of the generator)."""
    question, scene = record["conversations"][0]["value"].removeprefix("<image>\n"), record["scene"]
    words = WORDS
    if record["type"] in QUESTION_SETS["graded"]:
        return expected_layout(record["type"], scene, size)
    if record["type"] == "count":
        shape = question.split()[2].removesuffix("s")
        return words[sum(o["shape"] == shape for o in scene)]
    target = next(o for o in scene if f"the {o['color']} object" in question)
    half = 112 / 2
    if record["type"] == "shape":
        return target["shape"]
    if record["type"] == "horizontal":
        return "left" if target["x"] < half else "right"
    if record["type"] == "vertical":
        return "top" if target["y"] < half else "bottom"
    if record["type"] == "same_shape_count":
        return words[sum(o["shape"] == target["shape"] for o in scene if o is not target)]
    others = sorted(scene, key=lambda o: math.hypot(o["x"] - target["x"], o["y"] - target["y"]))[1:]
    if record["type"] == "farthest":
        others.reverse()
    d = [math.hypot(o["x"] - target["x"], o["y"] - target["y"]) for o in others[:2]]
    assert len(d) == 1 or abs(d[0] - d[1]) > 2, f"{record['id']}: ambiguous {record['type']} question"
    return others[0]["color"] if record["type"] == "closest" else others[0]["shape"]


def test_every_answer_is_right(big):
    size = big[2].get("image_size", 112)
    for r in big[1]:
        assert r["conversations"][1]["value"] == expected_answer(r, size), r["id"]


def test_scene_is_what_is_drawn(big):
    out, records, kw = big
    white, size = (255, 255, 255), kw.get("image_size", 112)
    d = round(8 * size / 112)  # inside a shape's bounding box, outside a circle and the triangle's top half
    for r in records[::PER_IMAGE][:40]:
        img = Image.open(out / r["image"]).convert("RGB")
        assert img.size == (size, size)
        for o in r["scene"]:
            x, y, fill = o["x"], o["y"], PALETTE[o["color"]]
            # the top-left and bottom-left corners tell the shapes apart: square both, triangle bottom only
            corners = tuple(img.getpixel((x - d, y + dy)) == fill for dy in (-d, d))
            assert img.getpixel((x, y)) == fill
            assert corners == {"square": (True, True), "triangle": (False, True), "circle": (False, False)}[o["shape"]]
            assert img.getpixel((x - d, y - d)) in (fill, white)
        assert img.getpixel((0, 0)) == white


def test_types_are_all_present_and_answers_balanced(big):
    by_type = collections.defaultdict(collections.Counter)
    for r in big[1]:
        by_type[r["type"]][r["conversations"][1]["value"]] += 1
    assert set(by_type) == set(QUESTION_SETS[big[2]["question_set"]])
    for qtype, answers in by_type.items():
        n = sum(answers.values())
        # a third of the fair share at least: empty_quarter is fair on fewer scenes (exactly one quarter empty)
        assert n > 0.3 * len(big[1]) / len(by_type), qtype
        assert answers.most_common(1)[0][1] / n <= 0.75, (qtype, answers)
    if big[2]["question_set"] == "objects":
        assert len(by_type["closest"]) == len(PALETTE) and len(by_type["farthest"]) == 3
    else:
        most = synthetic.object_counts(big[2]["n_objects"])[1]
        # with 7 or 8 objects all of them in one half is rare: the counts seen reach five at least
        assert len(by_type["empty_quarter"]) == 4 and set(WORDS[:min(most, 5) + 1]) <= set(by_type["count_left"]) \
            <= set(WORDS[:most + 1])


def test_question_text_alone_does_not_give_the_answer(big):
    """A guesser that reads only the question (the majority answer of each question string, fit on one half) does
    no better on the other half than the base rate of its type: only the image can answer."""
    question, answer = (lambda r: r["conversations"][0]["value"]), (lambda r: r["conversations"][1]["value"])
    fit, held_out = big[1][::2], big[1][1::2]
    types = QUESTION_SETS[big[2]["question_set"]]
    by_question, by_type = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for r in fit:
        by_question[question(r)][answer(r)] += 1
        by_type[r["type"]][answer(r)] += 1
    for qtype in types:
        rs = [r for r in held_out if r["type"] == qtype]
        text = sum(answer(r) == by_question[question(r)].most_common(1)[0][0] for r in rs if question(r) in by_question)
        base = sum(answer(r) == by_type[qtype].most_common(1)[0][0] for r in rs)
        # "closest to the red object" is never red: 1/7 instead of 1/8, a fair base-rate difference
        assert text / len(rs) <= base / len(rs) + 0.1, (qtype, text, base, len(rs))


def test_writes_are_atomic(tmp_path, monkeypatch):
    out = tmp_path / "ok"
    generate(out, 4, 2, seed=0)
    assert sorted(files(out)) == ["data.json"] + [f"images/{i:06d}.png" for i in range(4)]  # no temp file left

    def broken(scene, image_size):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "draw", broken)
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "failed", 4, 2, seed=0)
    assert files(tmp_path / "failed") == {}  # no half-written data.json or image


def test_cli_and_argument_checks(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--n_images", "2", "--seed", "3", "--image_size", "64",
                    "--n_objects", "3", "--questions_per_image", "5"])
    assert "data.json" in capsys.readouterr().out
    records = json.loads((tmp_path / "data.json").read_text())
    assert len(records) == 10 and all(len(r["scene"]) == 3 for r in records)
    assert Image.open(tmp_path / "images/000001.png").size == (64, 64)
    for kw, match in [(dict(n_objects=0), "n_objects=0"), (dict(n_objects=len(PALETTE) + 1), "one colour per object"),
                      (dict(n_objects=(5, 2)), "n_objects=5-2: use 1..8 .* a range from low to high"),
                      (dict(n_objects="1-x"), "n_objects='1-x': give a number of objects, or a range like 1-8"),
                      (dict(image_size=16), "too small"), (dict(n_images=0), "must be >= 1")]:
        with pytest.raises(ValueError, match=match):
            generate(tmp_path / "x", **{"n_images": 1, **kw})
    # from the shell: one line and exit code 2, nothing written
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--out", str(tmp_path / "bad"), "--n_objects", "0"])
    said = f"n_objects=0: use 1..{len(PALETTE)} (one colour per object), a range from low to high\n"
    assert e.value.code == 2 and capsys.readouterr().err == said
    assert not (tmp_path / "bad").exists()


def test_multi_turn_puts_every_question_of_an_image_in_one_record(tmp_path):
    single = json.loads(generate(tmp_path / "single", n_images=3, questions_per_image=5, seed=2).read_text())
    multi = json.loads(generate(tmp_path / "multi", n_images=3, questions_per_image=5, seed=2,
                                multi_turn=True).read_text())
    assert len(single) == 15 and len(multi) == 3
    for i, record in enumerate(multi):
        turns = record["conversations"]
        same_image = single[5 * i:5 * i + 5]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 5
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        want = [t["value"] for r in same_image for t in r["conversations"]]
        assert [t["value"] for t in turns] == [want[0]] + [v.removeprefix("<image>\n") for v in want[1:]]
        assert record["type"] == same_image[0]["type"] and record["image"] == same_image[0]["image"]


def test_held_out_writes_the_training_set_and_another_seeds_held_out_set(tmp_path, capsys):
    """--held_out N: the set to OUT/train and N other images to OUT/eval (seed + 10000, one question per record),
    byte for byte what generate() writes with those arguments; what train.py reads as --data and --eval_data."""
    synthetic.main(["--out", str(tmp_path / "cli"), "--n_images", "3", "--questions_per_image", "8", "--multi_turn",
                    "--held_out", "2", "--n_objects", "3", "--image_size", "64", "--seed", "5"])
    generate(tmp_path / "api" / "train", 3, 8, seed=5, image_size=64, n_objects=3, multi_turn=True)
    generate(tmp_path / "api" / "eval", 2, seed=5 + synthetic.HELD_OUT_SEED, image_size=64, n_objects=3)
    for part in ("train", "eval"):
        assert (tmp_path / "cli" / part / "data.json").read_bytes() == \
            (tmp_path / "api" / part / "data.json").read_bytes()
    assert len(json.loads((tmp_path / "cli" / "eval" / "data.json").read_text())) == 2 * 4
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--out", str(tmp_path / "bad"), "--held_out", "-1"])
    assert e.value.code == 2 and "--held_out -1" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_range_of_objects_from_the_command_line(tmp_path):
    """--n_objects 1-8 draws each image's count; a fixed count draws nothing more, so that a set made before ranges
    existed is made again byte for byte (its images are the same whatever the range code does)."""
    synthetic.main(["--out", str(tmp_path / "range"), "--n_images", "40", "--n_objects", "1-8", "--image_size", "64"])
    counts = {len(r["scene"]) for r in json.loads((tmp_path / "range" / "data.json").read_text())}
    assert counts <= set(range(1, 9)) and len(counts) >= 6
    synthetic.main(["--out", str(tmp_path / "three"), "--n_images", "4", "--n_objects", "3", "--image_size", "64"])
    generate(tmp_path / "pair", 4, 4, seed=0, image_size=64, n_objects=(3, 3))
    assert files(tmp_path / "three") == files(tmp_path / "pair")
