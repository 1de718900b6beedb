"""A Sort-of-CLEVR-like visual QA set, generated from a seed with no download, written in LLaVA's JSON format.

Sort-of-CLEVR (Santoro et al. 2017, "A simple neural network module for relational reasoning"): a few flat shapes of
distinct colours on a white canvas, and short questions about them, in one of two sets:
- "layout" (the default): where things are, with no object named. Are more objects on the left or the right, at the
  top or the bottom; how many are in the left (top) half; is there one in the centre; which quarter of the image is
  empty. The mean of the image's patch features keeps these answers only as a faint direction (nanovoco.repro.probe),
  while attention over the patches reads them plainly: this is the set on which the reproduction compares
  VoCo-LLaMA with average pooling.
- "graded": the layout questions and two more about the quarters (which one holds the most objects, how many are
  empty), asked of scenes of 1 to 8 objects (`--n_objects 1-8`) in the reproduction: their answers need more of the
  image as it fills, and the number of objects is the content measure by which the reproduction asks how much one
  VoCo token keeps.
- "objects": Sort-of-CLEVR's own. Non-relational questions ask about the object of a given colour (its shape, which
  half of the image it is in) or count a shape; relational ones ask about an object through another (the closest,
  the farthest, how many share its shape). The tiny LLMs of the reproduction never learn to find the object that a
  colour names (docs/results.md), so this set measures what the image holds as a whole.
The answers depend on the image only, so a model that learns them must read the image through whatever it is given
of it: here, a few VoCo tokens.

    python -m nanovoco.repro.synthetic --out data/sort_of_clevr --n_images 10000 --seed 0 [--questions objects]
        [--n_objects 1-8]

writes out/images/000000.png, ... and out/data.json, one LLaVA record per question (with --held_out N, the set goes
to out/train/ and N held-out images, of another seed, to out/eval/):
    {"id": "000000_0", "image": "images/000000.png", "type": "count_left",
     "conversations": [{"from": "human", "value": "<image>\\nHow many objects are in the left half?"},
                       {"from": "gpt", "value": "two"}],
     "scene": [{"color": "red", "shape": "circle", "x": 14, "y": 42}, ...]}
"type" and "scene" are ours (LLaVA ignores extra keys): per-type accuracy, and answers that can be checked.
"""
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from nanovoco import cli
from nanovoco.files import atomic_write

PALETTE = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "orange": (245, 140, 20),
           "gray": (128, 128, 128), "yellow": (230, 200, 20), "purple": (140, 60, 170), "cyan": (30, 190, 200)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")  # counts go up to len(PALETTE)
GRID = 4  # objects sit at the centres of a GRID x GRID grid of cells, at most one per cell: they never overlap
MIDDLE = range(GRID // 4, GRID - GRID // 4)  # the rows and columns of the cells that `centre` asks about (2 x 2)
QUARTERS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_SETS = {
    "layout": ("left_right", "top_bottom", "count_left", "count_top", "centre", "empty_quarter"),
    # the layout's questions and two more about the four quarters, for scenes of 1 to 8 objects (the graded set)
    "graded": ("left_right", "top_bottom", "count_left", "count_top", "centre", "empty_quarter", "busiest_quarter",
               "empty_quarters"),
    "objects": ("shape", "horizontal", "vertical", "count",  # non-relational
                "closest", "farthest", "same_shape_count"),  # relational
}
QUESTION_TYPES = tuple(dict.fromkeys(t for types in QUESTION_SETS.values() for t in types))
ANSWERS = SHAPES + ("left", "right", "top", "bottom", "yes", "no") + tuple(PALETTE) + NUMBERS + QUARTERS


def make_scene(rng: random.Random, image_size: int, n_objects: int) -> list[dict]:
    """n_objects objects, each of its own colour, a random shape, in distinct grid cells (centres in pixels)."""
    cell = image_size / GRID
    cells = rng.sample(range(GRID * GRID), n_objects)
    colors = rng.sample(list(PALETTE), n_objects)
    return [{"color": color, "shape": rng.choice(SHAPES),
             "x": round((k % GRID + 0.5) * cell), "y": round((k // GRID + 0.5) * cell)}
            for color, k in zip(colors, cells)]


def draw(scene: list[dict], image_size: int) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), "white")
    canvas = ImageDraw.Draw(img)
    r = 0.35 * image_size / GRID  # objects fill 70% of a cell, so neighbours never touch
    for o in scene:
        x, y, fill = o["x"], o["y"], PALETTE[o["color"]]
        if o["shape"] == "circle":
            canvas.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o["shape"] == "square":
            canvas.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            canvas.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return img


def extreme(scene: list[dict], i: int, qtype: str, image_size: int):
    """Index of the object closest to (qtype "closest") or farthest from ("farthest") object i, or None when the
    runner-up is about as close (as far): on a grid distances often tie, e.g. one neighbour left and one above."""
    others = sorted((math.dist((scene[i]["x"], scene[i]["y"]), (o["x"], o["y"])), j)
                    for j, o in enumerate(scene) if j != i)
    if not others:  # a scene of one object
        return None
    if qtype == "farthest":
        others.reverse()
    if len(others) > 1 and abs(others[0][0] - others[1][0]) <= 0.1 * image_size / GRID:
        return None
    return others[0][1]


def quarter(o: dict, image_size: int) -> str:
    """The quarter of the image that object o's centre is in, as the answers spell it ("top left", ...)."""
    half = image_size / 2
    return f"{'top' if o['y'] < half else 'bottom'} {'left' if o['x'] < half else 'right'}"


def ask_layout(scene: list[dict], qtype: str, image_size: int):
    """(question, answer) of a layout type, or None if this scene has no fair one. The wording of each type is
    fixed, so the answer is a function of the scene alone."""
    half, cell = image_size / 2, image_size / GRID
    left = sum(o["x"] < half for o in scene)
    top = sum(o["y"] < half for o in scene)
    if qtype in ("left_right", "top_bottom"):
        first, n = (left, "left") if qtype == "left_right" else (top, "top")
        if 2 * first == len(scene):  # a tie has no answer
            return None
        other = {"left": "right", "top": "bottom"}[n]
        where = "on the left or on the right" if n == "left" else "at the top or at the bottom"
        return f"Are more objects {where}?", n if 2 * first > len(scene) else other
    if qtype == "count_left":
        return "How many objects are in the left half?", NUMBERS[left]
    if qtype == "count_top":
        return "How many objects are in the top half?", NUMBERS[top]
    if qtype == "centre":  # the MIDDLE x MIDDLE cells (2 x 2 of the 4 x 4 grid)
        occupied = any(int(o["x"] // cell) in MIDDLE and int(o["y"] // cell) in MIDDLE for o in scene)
        return "Is there an object in the centre?", "yes" if occupied else "no"
    in_quarter = {q: sum(quarter(o, image_size) == q for o in scene) for q in QUARTERS}
    if qtype == "empty_quarter":
        empty = [q for q, n in in_quarter.items() if n == 0]
        return ("Which quarter of the image is empty?", empty[0]) if len(empty) == 1 else None
    if qtype == "busiest_quarter":
        busiest = [q for q, n in in_quarter.items() if n == max(in_quarter.values())]
        return ("Which quarter of the image holds the most objects?", busiest[0]) if len(busiest) == 1 else None
    if qtype == "empty_quarters":
        return "How many quarters of the image are empty?", NUMBERS[sum(n == 0 for n in in_quarter.values())]
    raise ValueError(f"unknown question type {qtype!r}: use one of {QUESTION_TYPES}")


def ask(rng: random.Random, scene: list[dict], qtype: str, image_size: int):
    """(question, answer) of type qtype (about a uniformly drawn target for the objects set), or None if this scene
    has no fair one."""
    if qtype in QUESTION_SETS["graded"]:
        return ask_layout(scene, qtype, image_size)
    if qtype == "count":
        shape = rng.choice(SHAPES)
        return f"How many {shape}s are there?", NUMBERS[sum(o["shape"] == shape for o in scene)]
    targets = list(range(len(scene)))
    if qtype in ("closest", "farthest"):
        targets = [i for i in targets if extreme(scene, i, qtype, image_size) is not None]
        if not targets:
            return None
    i = rng.choice(targets)
    o, color = scene[i], scene[i]["color"]
    if qtype == "shape":
        return f"What shape is the {color} object?", o["shape"]
    if qtype == "horizontal":
        return f"Is the {color} object on the left or the right?", "left" if o["x"] < image_size / 2 else "right"
    if qtype == "vertical":
        return f"Is the {color} object at the top or the bottom?", "top" if o["y"] < image_size / 2 else "bottom"
    if qtype == "closest":
        nearest = scene[extreme(scene, i, qtype, image_size)]
        return f"What is the colour of the object closest to the {color} object?", nearest["color"]
    if qtype == "farthest":
        farthest = scene[extreme(scene, i, qtype, image_size)]
        return f"What shape is the object farthest from the {color} object?", farthest["shape"]
    if qtype == "same_shape_count":
        same = sum(p["shape"] == o["shape"] for p in scene) - 1
        return f"How many other objects have the same shape as the {color} object?", NUMBERS[same]
    raise ValueError(f"unknown question type {qtype!r}: use one of {QUESTION_TYPES}")


def questions(rng: random.Random, scene: list[dict], n: int, image_size: int,
              types=QUESTION_SETS["layout"]) -> list[tuple[str, str, str]]:
    """n (type, question, answer) about one scene. Types are dealt from shuffled decks of all types, so an image
    gets different kinds of questions and every type is about equally frequent."""
    out, deck = [], []
    while len(out) < n:
        if not deck:
            deck = rng.sample(types, len(types))
        qtype = deck.pop()
        qa = ask(rng, scene, qtype, image_size)
        if qa is not None:  # some types have no fair question in some scenes; count_left and shape always do
            out.append((qtype, *qa))
    return out


HELD_OUT_SEED = 10_000  # a held-out set's seed is the training set's + this: other images, never the same


def object_counts(n_objects) -> tuple[int, int]:
    """n_objects as (fewest, most) objects per image: an int N is (N, N), a pair is itself, and so is the command
    line's "LO-HI" (e.g. "1-8": each image draws its count uniformly from 1 to 8)."""
    if isinstance(n_objects, str):
        lo, _, hi = n_objects.partition("-")
        try:
            n_objects = (int(lo), int(hi or lo))
        except ValueError:
            raise ValueError(f"n_objects={n_objects!r}: give a number of objects, or a range like 1-8") from None
    lo, hi = (n_objects, n_objects) if isinstance(n_objects, int) else n_objects
    if not 1 <= lo <= hi <= len(PALETTE):
        raise ValueError(f"n_objects={lo if lo == hi else f'{lo}-{hi}'}: use 1..{len(PALETTE)} (one colour per "
                         f"object), a range from low to high")
    return lo, hi


def generate(out_dir, n_images: int = 1000, questions_per_image: int = 4, seed: int = 0, image_size: int = 112,
             n_objects: int | tuple[int, int] = 6, multi_turn: bool = False, question_set: str = "layout") -> Path:
    """Write n_images PNGs to out_dir/images/ and one LLaVA record per question to out_dir/data.json; return the
    JSON's path. multi_turn=True writes one record per image instead, its questions as the turns of one
    conversation (as most of LLaVA's data is): one forward pass then trains on every question of the image.
    question_set names the questions' set (QUESTION_SETS); n_objects is the objects per image, or a (fewest, most)
    range that each image draws its count from uniformly (object_counts). The same arguments give byte-identical
    files; image i depends only on (seed, i)."""
    if question_set not in QUESTION_SETS:
        raise ValueError(f"question set {question_set!r}: use one of {', '.join(QUESTION_SETS)}")
    lo, hi = object_counts(n_objects)
    if image_size < 8 * GRID:
        raise ValueError(f"image_size={image_size} is too small for a {GRID}x{GRID} grid: use at least {8 * GRID}")
    if n_images < 1 or questions_per_image < 1:
        raise ValueError(f"n_images={n_images}, questions_per_image={questions_per_image}: both must be >= 1")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(n_images), desc="sort-of-clevr", unit="image"):
        rng = random.Random(f"{seed}/{i}")  # a string seed hashes (sha512) to the same state on every platform
        # a fixed count draws nothing, so that such sets stay byte-identical to those made before ranges existed
        scene = make_scene(rng, image_size, lo if lo == hi else rng.randint(lo, hi))
        image = f"images/{i:06d}.png"
        img = draw(scene, image_size)
        # PIL picks the format from the name's suffix, and the temporary name has none
        atomic_write(out_dir / image, lambda tmp: img.save(tmp, format="PNG"))
        qas = questions(rng, scene, questions_per_image, image_size, QUESTION_SETS[question_set])
        records += llava_records(i, image, qas, scene, multi_turn)
    return write_json(out_dir, records)


def llava_records(i: int, image, qas, scene, multi_turn: bool) -> list[dict]:
    """The LLaVA records of image (or video) i: one per (type, question, answer) in qas, or with multi_turn one
    record whose turns are all of them ("<image>" in the first question only, as LLaVA's data has it)."""
    records = []
    for q, group in enumerate([qas] if multi_turn else [[qa] for qa in qas]):
        turns = [turn for k, (_, question, answer) in enumerate(group)
                 for turn in ({"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
                              {"from": "gpt", "value": answer})]
        records.append({"id": f"{i:06d}_{q}", "image": image, "type": group[0][0], "conversations": turns,
                        "scene": scene})
    return records


def write_json(out_dir: Path, records: list[dict]) -> Path:
    path = out_dir / "data.json"
    text = json.dumps(records, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def main(argv=None):
    p = cli.ArgumentParser(description="Generate a Sort-of-CLEVR visual QA set in LLaVA's JSON format.")
    p.add_argument("--out", required=True, type=Path, help="output directory (images/ and data.json)")
    p.add_argument("--n_images", type=int, default=1000)
    p.add_argument("--questions_per_image", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--n_objects", default="6", help="objects per image, or a range LO-HI (e.g. 1-8) that each "
                   "image draws its count from")
    p.add_argument("--multi_turn", action="store_true", help="one record per image, its questions as turns")
    p.add_argument("--questions", default="layout", choices=QUESTION_SETS, help="where things are (layout) or the "
                   "object named by its colour (objects)")
    p.add_argument("--held_out", type=int, default=0, help="> 0: the set above goes to OUT/train, and this many "
                   f"held-out images (seed + {HELD_OUT_SEED}, 4 questions each, one per record) to OUT/eval")
    a = p.parse_args(argv)
    options = dict(image_size=a.image_size, n_objects=a.n_objects, question_set=a.questions)
    try:  # the arguments are checked before anything is written
        paths = write_sets(generate, a.out, a.n_images, a.questions_per_image, a.seed, a.multi_turn, a.held_out,
                           **options)
    except ValueError as e:
        p.exit(2, f"{e}\n")
    print("wrote " + ", ".join(map(str, paths)))


def write_sets(generate, out: Path, n: int, questions_per_item: int, seed: int, multi_turn: bool, held_out: int,
               **options) -> list[Path]:
    """The command line's sets, from `generate` (this module's, or synthetic_video's): n items into out, or with
    held_out > 0 into out/train, and held_out other items (seed + HELD_OUT_SEED, one question per record, as
    evaluation reads them) into out/eval. Returns the JSON files' paths."""
    if held_out < 0:
        raise ValueError(f"--held_out {held_out}: give 0 (no held-out set) or more")
    paths = [generate(out / "train" if held_out else out, n, questions_per_item, seed, multi_turn=multi_turn,
                      **options)]
    if held_out:
        paths.append(generate(out / "eval", held_out, seed=seed + HELD_OUT_SEED, **options))
    return paths


if __name__ == "__main__":
    main()
