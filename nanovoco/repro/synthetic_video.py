"""A moving-shapes video QA set, the video sibling of nanovoco.repro.synthetic: generated from a seed, in LLaVA's
JSON format.

VoCo-LLaMA extends to video by compressing each frame to its own VoCo tokens and letting the LLM answer from the
sequence of them. These videos test what that sequence must keep: the order of the frames. A few flat shapes of
distinct colours sit on Sort-of-CLEVR's GRID x GRID cells; between consecutive frames exactly one object moves to a
free neighbouring cell. The mover is always one of the objects that have moved least so far (and can move), so in the
default videos (3 objects, 4 frames, 3 moves) each object nearly always moves exactly once; a video of one object
moves it every frame. The temporal questions change their answer when the frames are played backwards, so a model
that sums the frames up as an unordered set cannot answer them. They come in two kinds: comparing frames (which
object moved first, which last, which way one moved, did one move before another, which way the first / the last
move went, which way an object went from the first frame to the last by the quarters of the image it was in), and
reading one frame by its place in time (in which quarter of the image an object was at the start, at the end).
"shape" has the same answer in every frame, a control. A video of one object is asked in the layout vocabulary of
nanovoco.repro.synthetic's default questions: the object is "the object" (nothing to tell it from, so no question
hinges on finding an object by its colour, which the models of nanovoco.repro do not learn; docs/results.md), and the
control is "frames_left", in how many frames the object is in the left half, which no reordering changes.

    python -m nanovoco.repro.synthetic_video --out data/moving_shapes --n_videos 10000 --seed 0

writes out/videos/000000/0.png, 1.png, ... and out/data.json, one LLaVA record per question; "image" lists a video's
frames in time order, for the one "<image>" tag:
    {"id": "000000_0", "image": ["videos/000000/0.png", ..., "videos/000000/3.png"], "type": "first_mover",
     "conversations": [{"from": "human", "value": "<image>\\nWhich object moved first?"},
                       {"from": "gpt", "value": "red"}],
     "scene": [[{"color": "red", "shape": "circle", "x": 7, "y": 21}, ...], ...]}
"scene" holds the objects of each frame, in the same order in every frame; it and "type" are ours (LLaVA ignores
extra keys): per-type accuracy, and answers that can be checked.
"""
import random
from pathlib import Path

from tqdm import tqdm

from nanovoco import cli
from nanovoco.files import atomic_write
from nanovoco.repro.synthetic import (GRID, HELD_OUT_SEED, NUMBERS, PALETTE, QUARTERS, SHAPES, draw,
                                      llava_records, make_scene, quarter, write_json, write_sets)

MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
# Reversing the video changes the answers of both kinds of temporal question
MOTION = ("first_mover", "last_mover", "direction", "before",  # comparing frames: what moved, which way, when
          "first_move", "last_move",  # the same, naming no object
          "overall")  # which way an object went from the first frame to the last, by the quarters of the image
WHEN = ("start", "end")  # reading one frame, chosen by its place in time
TEMPORAL = MOTION + WHEN
CONTROLS = ("shape", "frames_left")  # order-free: shape with several objects, frames_left with one
QUESTION_TYPES = TEMPORAL + CONTROLS
ANSWERS = tuple(PALETTE) + tuple(MOVES) + ("yes", "no") + QUARTERS + SHAPES + NUMBERS


def n_answers(qtype: str, n_objects: int, n_frames: int) -> int:
    """How many answers a question of type qtype can have in a video of n_objects objects and n_frames frames: chance
    is one over it."""
    return {"first_mover": n_objects, "last_mover": n_objects, "before": 2, "start": len(QUARTERS),
            "end": len(QUARTERS), "shape": len(SHAPES), "frames_left": n_frames + 1}.get(qtype, len(MOVES))


def name(o: dict, objects: list[dict]) -> str:
    """How a question names object o: by its colour and shape, or "the object" when it is the only one."""
    return "the object" if len(objects) == 1 else f"the {o['color']} {o['shape']}"


def step(o: dict, direction: str, image_size: int):
    """Object o moved one cell in direction, centred as make_scene centres it (a moved object sits exactly where a
    fresh one in that cell would), or None if that would leave the grid."""
    cell = image_size / GRID
    col, row = o["x"] // cell + MOVES[direction][0], o["y"] // cell + MOVES[direction][1]
    if not (0 <= col < GRID and 0 <= row < GRID):
        return None
    return {**o, "x": round((col + 0.5) * cell), "y": round((row + 0.5) * cell)}


def make_video(rng: random.Random, image_size: int, n_frames: int, n_objects: int):
    """(frames, moves): n_frames scenes, each one move (object index, direction) after the previous one. The move is
    drawn uniformly from the legal moves (onto a free cell) of the objects that have moved least so far; an object
    walled in by the edge and its neighbours waits, and some other one can always move (on a grid with a free cell,
    some free cell is next to an occupied one)."""
    frames = [make_scene(rng, image_size, n_objects)]
    moves, n_moved = [], [0] * n_objects
    for _ in range(n_frames - 1):
        scene = frames[-1]
        taken = {(o["x"], o["y"]) for o in scene}
        moved = {(i, d): step(o, d, image_size) for i, o in enumerate(scene) for d in MOVES}
        legal = [(i, d) for (i, d), m in moved.items() if m is not None and (m["x"], m["y"]) not in taken]
        fewest = min(n_moved[i] for i, _ in legal)
        i, d = rng.choice([(i, d) for i, d in legal if n_moved[i] == fewest])
        n_moved[i] += 1
        moves.append((i, d))
        frames.append([moved[i, d] if j == i else o for j, o in enumerate(scene)])
    return frames, moves


def way(start: str, end: str) -> str | None:
    """Which way an object went from quarter start to quarter end ("left", "up", ...); None unless exactly one of the
    halves changed, so that one direction names the change."""
    (y0, x0), (y1, x1) = start.split(), end.split()
    if (x0 != x1) == (y0 != y1):
        return None
    return x1 if x0 != x1 else {"top": "up", "bottom": "down"}[y1]


def ask(rng: random.Random, frames: list[list[dict]], moves: list[tuple[int, str]], qtype: str, image_size: int):
    """(question, answer) of type qtype, or None if this video has no fair one: a temporal question is asked only
    when playing the video backwards changes its answer, so it cannot be answered without the order."""
    objects, movers = frames[0], [i for i, _ in moves]
    once = [i for i in range(len(objects)) if movers.count(i) == 1]  # "which way did it move" needs one move
    if qtype == "shape":
        if len(objects) == 1:
            return None
        o = rng.choice(objects)
        return f"What shape is the {o['color']} object?", o["shape"]
    if qtype == "frames_left":
        if len(objects) > 1:
            return None
        left = sum(2 * scene[0]["x"] < image_size for scene in frames)
        return "In how many frames is the object in the left half?", NUMBERS[left]
    if qtype in ("first_mover", "last_mover"):
        if movers[0] == movers[-1]:  # backwards, the first mover is the last: the same answer both ways
            return None
        first = qtype == "first_mover"
        return f"Which object moved {'first' if first else 'last'}?", objects[movers[0 if first else -1]]["color"]
    if qtype == "direction":
        if not once:
            return None
        i = rng.choice(once)
        o = objects[i]
        return f"Which way did {name(o, objects)} move?", moves[movers.index(i)][1]
    if qtype in ("first_move", "last_move"):
        # Which way the first (last) move went: no object is named, so a model that knows what moved where in each
        # frame, but cannot find an object by its colour, can still answer it, from the order of the frames alone.
        # Backwards, the first move is the last one undone: asked only when that gives another answer.
        first = qtype == "first_move"
        forward = moves[0 if first else -1][1]
        backward = OPPOSITE[moves[-1 if first else 0][1]]
        if forward == backward:
            return None
        return f"Which way did the {'first' if first else 'last'} move go?", forward
    if qtype == "overall":
        # by the quarters it was in at the start and at the end (backwards, the opposite way)
        i = rng.randrange(len(objects))
        answer = way(quarter(frames[0][i], image_size), quarter(frames[-1][i], image_size))
        if answer is None:
            return None
        o = objects[i]
        return f"Which way did {name(o, objects)} go from the start to the end?", answer
    if qtype in ("start", "end"):
        i = rng.randrange(len(objects))
        start, end = quarter(frames[0][i], image_size), quarter(frames[-1][i], image_size)
        if start == end:  # backwards, the start is the end
            return None
        o = objects[i]
        return f"Where was {name(o, objects)} at the {qtype}?", start if qtype == "start" else end
    if qtype == "before":
        if len(once) < 2:
            return None
        i, j = rng.sample(once, 2)  # a random order of the pair: "yes" and "no" equally likely
        return (f"Did the {objects[i]['color']} object move before the {objects[j]['color']} object?",
                "yes" if movers.index(i) < movers.index(j) else "no")
    raise ValueError(f"unknown question type {qtype!r}: use one of {QUESTION_TYPES}")


def questions(rng: random.Random, frames, moves, n: int, image_size: int) -> list[tuple[str, str, str]]:
    """n (type, question, answer) about one video, types dealt from shuffled decks of all types (as in
    nanovoco.repro.synthetic), so a video gets different kinds of questions and every type is about equally frequent."""
    types = TEMPORAL + (("frames_left",) if len(frames[0]) == 1 else ("shape",))
    out, deck = [], []
    while len(out) < n:
        if not deck:
            deck = rng.sample(types, len(types))
        qtype = deck.pop()
        qa = ask(rng, frames, moves, qtype, image_size)
        if qa is not None:  # the control never fails: the loop ends
            out.append((qtype, *qa))
    return out


def generate(out_dir, n_videos: int = 1000, questions_per_video: int = 4, seed: int = 0, image_size: int = 56,
             n_frames: int = 4, n_objects: int = 3, multi_turn: bool = False) -> Path:
    """Write n_videos videos of n_frames PNGs each to out_dir/videos/ and one LLaVA record per question to
    out_dir/data.json; return the JSON's path. multi_turn=True writes one record per video instead, its questions as
    the turns of one conversation. The default image_size is the tiny model's: one 14 px patch per grid cell.
    The same arguments give byte-identical files; video i depends only on (seed, i)."""
    if not 1 <= n_objects <= len(PALETTE):  # len(PALETTE) < GRID * GRID: some object can always move
        raise ValueError(f"n_objects={n_objects}: use 1..{len(PALETTE)} (one colour per object)")
    if image_size < 8 * GRID:
        raise ValueError(f"image_size={image_size} is too small for a {GRID}x{GRID} grid: use at least {8 * GRID}")
    if n_frames < 3:
        raise ValueError(f"n_frames={n_frames}: use at least 3 (two moves, so that there is an order to ask about)")
    if n_videos < 1 or questions_per_video < 1:
        raise ValueError(f"n_videos={n_videos}, questions_per_video={questions_per_video}: both must be >= 1")
    out_dir = Path(out_dir)
    records = []
    for i in tqdm(range(n_videos), desc="moving shapes", unit="video"):
        rng = random.Random(f"{seed}/{i}")  # a string seed hashes (sha512) to the same state on every platform
        frames, moves = make_video(rng, image_size, n_frames, n_objects)
        (out_dir / f"videos/{i:06d}").mkdir(parents=True, exist_ok=True)
        video = [f"videos/{i:06d}/{t}.png" for t in range(n_frames)]
        for name, scene in zip(video, frames):
            img = draw(scene, image_size)
            # PIL picks the format from the name's suffix, and the temporary name has none
            atomic_write(out_dir / name, lambda tmp: img.save(tmp, format="PNG"))
        records += llava_records(i, video, questions(rng, frames, moves, questions_per_video, image_size), frames,
                                 multi_turn)
    return write_json(out_dir, records)


def main(argv=None):
    p = cli.ArgumentParser(description="Generate a moving-shapes video QA set in LLaVA's JSON format.")
    p.add_argument("--out", required=True, type=Path, help="output directory (videos/ and data.json)")
    p.add_argument("--n_videos", type=int, default=1000)
    p.add_argument("--questions_per_video", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=56)
    p.add_argument("--n_frames", type=int, default=4)
    p.add_argument("--n_objects", type=int, default=3)
    p.add_argument("--multi_turn", action="store_true", help="one record per video, its questions as turns")
    p.add_argument("--held_out", type=int, default=0, help="> 0: the set above goes to OUT/train, and this many "
                   f"held-out videos (seed + {HELD_OUT_SEED}, 4 questions each, one per record) to OUT/eval")
    a = p.parse_args(argv)
    options = dict(image_size=a.image_size, n_frames=a.n_frames, n_objects=a.n_objects)
    try:  # the arguments are checked before anything is written
        paths = write_sets(generate, a.out, a.n_videos, a.questions_per_video, a.seed, a.multi_turn, a.held_out,
                           **options)
    except ValueError as e:
        p.exit(2, f"{e}\n")
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
