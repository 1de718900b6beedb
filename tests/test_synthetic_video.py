"""The moving-shapes video generator: deterministic, correct (moves and answers recomputed here from each stored
scene, scenes checked against the pixels), about the order of the frames (playing a video backwards changes every
temporal answer), balanced, and written atomically."""
import collections
import json
import re

import pytest
from PIL import Image

from nanovoco.repro import synthetic_video
from nanovoco.repro.synthetic_video import ANSWERS, PALETTE, QUARTERS, QUESTION_TYPES, TEMPORAL, generate, n_answers

N_VIDEOS, PER_VIDEO, SIZE, CELL = 300, 5, 56, 14
DIRECTIONS = {(-CELL, 0): "left", (CELL, 0): "right", (0, -CELL): "up", (0, CELL): "down"}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    out = tmp_path_factory.mktemp("videos")
    return out, json.loads(generate(out, N_VIDEOS, PER_VIDEO, seed=0).read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One object, moving every frame: only the questions that need no object told from another can be asked."""
    out = tmp_path_factory.mktemp("single")
    return out, json.loads(generate(out, 100, PER_VIDEO, seed=2, n_objects=1).read_text())


@pytest.fixture(scope="module")
def long(tmp_path_factory):
    """4 moves of 3 objects: one object moves twice, so some questions have no fair form and must be skipped."""
    out = tmp_path_factory.mktemp("long")
    return out, json.loads(generate(out, 60, PER_VIDEO, seed=1, n_frames=5).read_text())


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def moves_of(frames):
    """[(object index, direction)] between consecutive frames, checking that exactly one object moves one cell."""
    moves = []
    for before, after in zip(frames, frames[1:]):
        assert [(o["color"], o["shape"]) for o in before] == [(o["color"], o["shape"]) for o in after]
        assert len({(o["x"], o["y"]) for o in after}) == len(after)  # never two objects in a cell
        changed = [(k, (b["x"] - a["x"], b["y"] - a["y"])) for k, (a, b) in enumerate(zip(before, after)) if a != b]
        assert len(changed) == 1 and changed[0][1] in DIRECTIONS, changed
        moves.append((changed[0][0], DIRECTIONS[changed[0][1]]))
    return moves


def expected_answer(qtype, question, frames):
    """The answer, recomputed from the question text and the frames (independently of the generator)."""
    question, objects, moves = question.removeprefix("<image>\n"), frames[0], moves_of(frames)
    movers = [k for k, _ in moves]

    def named(verb):  # the index of the object the question names ("the object" when it is the only one)
        if len(objects) == 1:
            assert f"the object {verb}" in question, question
            return 0
        return next(k for k, o in enumerate(objects) if f"the {o['color']} {o['shape']} {verb}" in question)

    if qtype in ("first_mover", "last_mover"):
        return objects[movers[0] if qtype == "first_mover" else movers[-1]]["color"]
    if qtype in ("first_move", "last_move"):
        return moves[0 if qtype == "first_move" else -1][1]
    if qtype in ("start", "end"):
        k = named("at")
        o = frames[0 if qtype == "start" else -1][k]
        return ("top" if o["y"] < SIZE / 2 else "bottom") + (" left" if o["x"] < SIZE / 2 else " right")
    if qtype == "overall":
        k = named("go")
        (x0, y0), (x1, y1) = ((frame[k]["x"] < SIZE / 2, frame[k]["y"] < SIZE / 2) for frame in (frames[0], frames[-1]))
        assert (x0 != x1) + (y0 != y1) == 1, question  # one half changed
        return ("left" if x1 else "right") if x0 != x1 else ("up" if y1 else "down")
    if qtype == "direction":
        k = named("move")
        assert movers.count(k) == 1, question
        return moves[movers.index(k)][1]
    if qtype == "before":
        colors = re.fullmatch(r"Did the (\w+) object move before the (\w+) object\?", question).groups()
        first, second = (next(k for k, o in enumerate(objects) if o["color"] == c) for c in colors)
        assert movers.count(first) == movers.count(second) == 1, question
        return "yes" if movers.index(first) < movers.index(second) else "no"
    if qtype == "frames_left":
        assert len(objects) == 1 and question == "In how many frames is the object in the left half?"
        return ("zero", "one", "two", "three", "four", "five")[sum(f[0]["x"] < SIZE / 2 for f in frames)]
    assert qtype == "shape" and len(objects) > 1
    return next(o["shape"] for o in objects if f"the {o['color']} object" in question)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c, short = (files(generate(tmp_path / name, n, 3, seed=seed).parent)
                      for name, n, seed in [("a", 6, 1), ("b", 6, 1), ("c", 6, 2), ("short", 3, 1)])
    assert a == b
    assert a["data.json"] != c["data.json"]
    assert any(a[name] != c[name] for name in a if name.endswith(".png"))
    # video i depends on (seed, i) only: a shorter run is a prefix of a longer one
    assert all(short[name] == a[name] for name in short if name.endswith(".png"))


def test_records_are_llava_video_records(big):
    out, records = big
    assert len(records) == N_VIDEOS * PER_VIDEO
    assert len({r["id"] for r in records}) == len(records)
    for r in records[:50]:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].count("<image>") == 1
        assert gpt["from"] == "gpt" and gpt["value"] in ANSWERS
        video = r["id"].split("_")[0]
        assert r["image"] == [f"videos/{video}/{t}.png" for t in range(4)]
        assert all((out / frame).is_file() for frame in r["image"]) and r["type"] in QUESTION_TYPES
        assert len(r["scene"]) == 4 and all(len(frame) == 3 for frame in r["scene"])
        assert len({o["color"] for o in r["scene"][0]}) == 3


def test_one_object_moves_one_cell_per_frame(big):
    for r in big[1][::PER_VIDEO]:
        moves_of(r["scene"])


@pytest.mark.parametrize("data", ["big", "long", "single"])
def test_every_answer_is_right(data, request):
    for r in request.getfixturevalue(data)[1]:
        assert r["conversations"][1]["value"] == expected_answer(r["type"], r["conversations"][0]["value"],
                                                                 r["scene"]), r["id"]


@pytest.mark.parametrize("data", ["big", "long", "single"])
def test_playing_backwards_changes_every_temporal_answer(data, request):
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up", "yes": "no", "no": "yes"}
    for r in request.getfixturevalue(data)[1]:
        question, answer, frames = r["conversations"][0]["value"], r["conversations"][1]["value"], r["scene"]
        backwards = expected_answer(r["type"], question, frames[::-1])
        if r["type"] in ("shape", "frames_left"):  # the controls: no order in them
            assert backwards == answer
        elif r["type"] in ("first_mover", "last_mover"):
            other = {"first_mover": "last_mover", "last_mover": "first_mover"}[r["type"]]
            assert backwards == expected_answer(other, question, frames) != answer, r["id"]
        elif r["type"] in ("first_move", "last_move"):
            assert backwards != answer, r["id"]  # backwards, the first move is the last one undone
        elif r["type"] in ("start", "end"):
            other = {"start": "end", "end": "start"}[r["type"]]
            assert backwards == expected_answer(other, question, frames) != answer, r["id"]
        else:
            assert backwards == opposite[answer], r["id"]


def test_scene_is_what_is_drawn(big):
    out, records = big
    white = (255, 255, 255)
    centres = [round((k + 0.5) * CELL) for k in range(4)]
    for r in records[::PER_VIDEO][:40]:
        for frame, scene in zip(r["image"], r["scene"]):
            img = Image.open(out / frame).convert("RGB")
            assert img.size == (SIZE, SIZE)
            at = {(o["x"], o["y"]): o for o in scene}
            for x in centres:
                for y in centres:
                    o = at.get((x, y))
                    assert img.getpixel((x, y)) == (PALETTE[o["color"]] if o else white)
                    if o:
                        # the top-left and bottom-left corners tell the shapes apart: square both, triangle bottom only
                        corners = tuple(img.getpixel((x - 4, y + dy)) == PALETTE[o["color"]] for dy in (-4, 4))
                        assert corners == {"square": (True, True), "triangle": (False, True),
                                           "circle": (False, False)}[o["shape"]]
            assert len(at) == len(scene)


def test_types_are_all_present_and_answers_balanced(big):
    by_type = collections.defaultdict(collections.Counter)
    for r in big[1]:
        by_type[r["type"]][r["conversations"][1]["value"]] += 1
    assert set(by_type) == set(QUESTION_TYPES) - {"frames_left"}  # frames_left: for one object
    for qtype, answers in by_type.items():
        n = sum(answers.values())
        # ten types share the questions; the object asked about changes its quarter of the image in few videos
        assert n > (30 if qtype in ("start", "end", "overall") else 140), qtype
        assert answers.most_common(1)[0][1] / n <= 0.6, (qtype, answers)
    assert len(by_type["first_mover"]) == len(by_type["last_mover"]) == len(PALETTE)
    assert len(by_type["direction"]) == len(by_type["first_move"]) == len(by_type["last_move"]) == 4
    assert len(by_type["before"]) == 2
    assert len(by_type["start"]) == len(by_type["end"]) == len(QUARTERS) and len(by_type["overall"]) == 4


def test_one_object_moves_every_frame_and_gets_only_questions_about_the_whole_frame(single):
    by_type = collections.Counter(r["type"] for r in single[1])
    assert set(by_type) == {"first_move", "last_move", "overall", "start", "end", "frames_left"}
    assert all("the object" in r["conversations"][0]["value"] for r in single[1]
               if r["type"] in ("overall", "start", "end"))  # the layout vocabulary: no colour, no shape
    for r in single[1][::PER_VIDEO]:
        assert [k for k, _ in moves_of(r["scene"])] == [0, 0, 0]
    # chance: one over the answers a question can have, which the generator never exceeds
    for qtype in (*TEMPORAL, "frames_left"):
        answers = {r["conversations"][1]["value"] for r in single[1] if r["type"] == qtype}
        assert len(answers) <= n_answers(qtype, 1, 4)
    assert n_answers("first_mover", 3, 4) == 3 and n_answers("direction", 3, 4) == 4 and n_answers("before", 3, 4) == 2


def test_question_text_alone_does_not_give_the_answer(big):
    """A guesser that reads only the question (the majority answer of each question string, fit on one half) does
    no better on the other half than the base rate of its type: only the frames can answer."""
    question, answer = (lambda r: r["conversations"][0]["value"]), (lambda r: r["conversations"][1]["value"])
    fit, held_out = big[1][::2], big[1][1::2]
    by_question, by_type = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for r in fit:
        by_question[question(r)][answer(r)] += 1
        by_type[r["type"]][answer(r)] += 1
    for qtype in set(QUESTION_TYPES) - {"frames_left"}:
        rs = [r for r in held_out if r["type"] == qtype]
        text = sum(answer(r) == by_question[question(r)].most_common(1)[0][0] for r in rs if question(r) in by_question)
        base = sum(answer(r) == by_type[qtype].most_common(1)[0][0] for r in rs)
        assert text / len(rs) <= base / len(rs) + 0.1, (qtype, text, base, len(rs))


def test_writes_are_atomic(tmp_path, monkeypatch):
    out = tmp_path / "ok"
    generate(out, 2, 2, seed=0)
    assert sorted(files(out)) == ["data.json"] + [f"videos/{i:06d}/{t}.png" for i in range(2) for t in range(4)]

    def broken(scene, image_size):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic_video, "draw", broken)
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "failed", 2, 2, seed=0)
    assert files(tmp_path / "failed") == {}  # no half-written data.json or frame


def test_cli_and_argument_checks(tmp_path, capsys):
    synthetic_video.main(["--out", str(tmp_path), "--n_videos", "2", "--seed", "3", "--image_size", "64",
                          "--n_frames", "5", "--n_objects", "4", "--questions_per_video", "3"])
    assert "data.json" in capsys.readouterr().out
    records = json.loads((tmp_path / "data.json").read_text())
    assert len(records) == 6 and all(len(r["scene"]) == 5 and len(r["scene"][0]) == 4 for r in records)
    assert records[-1]["image"][-1] == "videos/000001/4.png"
    assert Image.open(tmp_path / "videos/000001/4.png").size == (64, 64)
    for kw, match in [(dict(n_objects=0), "n_objects=0"), (dict(n_objects=len(PALETTE) + 1), "one colour per object"),
                      (dict(image_size=16), "too small"), (dict(n_frames=2), "at least 3"),
                      (dict(n_videos=0), "must be >= 1")]:
        with pytest.raises(ValueError, match=match):
            generate(tmp_path / "x", **{"n_videos": 1, **kw})
    # from the shell: one line and exit code 2, nothing written
    with pytest.raises(SystemExit) as e:
        synthetic_video.main(["--out", str(tmp_path / "bad"), "--n_objects", "0"])
    said = f"n_objects=0: use 1..{len(PALETTE)} (one colour per object)\n"
    assert e.value.code == 2 and capsys.readouterr().err == said
    assert not (tmp_path / "bad").exists()


def test_multi_turn_puts_every_question_of_a_video_in_one_record(tmp_path):
    single = json.loads(generate(tmp_path / "single", n_videos=3, questions_per_video=5, seed=2).read_text())
    multi = json.loads(generate(tmp_path / "multi", n_videos=3, questions_per_video=5, seed=2,
                                multi_turn=True).read_text())
    assert len(single) == 15 and len(multi) == 3
    for i, record in enumerate(multi):
        turns = record["conversations"]
        same_video = single[5 * i:5 * i + 5]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 5
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        want = [t["value"] for r in same_video for t in r["conversations"]]
        assert [t["value"] for t in turns] == [want[0]] + [v.removeprefix("<image>\n") for v in want[1:]]
        assert record["type"] == same_video[0]["type"] and record["image"] == same_video[0]["image"]
        assert record["scene"] == same_video[0]["scene"]


def test_held_out_writes_the_training_set_and_another_seeds_held_out_set(tmp_path):
    synthetic_video.main(["--out", str(tmp_path / "cli"), "--n_videos", "2", "--questions_per_video", "8",
                          "--multi_turn", "--held_out", "2", "--n_objects", "1", "--image_size", "64", "--seed", "5"])
    generate(tmp_path / "api" / "train", 2, 8, seed=5, image_size=64, n_objects=1, multi_turn=True)
    generate(tmp_path / "api" / "eval", 2, seed=5 + 10_000, image_size=64, n_objects=1)
    for part in ("train", "eval"):
        assert (tmp_path / "cli" / part / "data.json").read_bytes() == \
            (tmp_path / "api" / part / "data.json").read_bytes()
