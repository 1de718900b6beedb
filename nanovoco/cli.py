"""The command line's rules, in one place for every script:

- an option may be spelled with underscores or hyphens (`--max_new_tokens`, `--max-new-tokens`): `respell`, which
  `ArgumentParser` applies to argparse scripts and train.py to its own options;
- train.py's help is its config dataclass's comments (`dataclass_help`): one source for the code and the help;
- an unknown option is answered with the closest known one (`closest`).
"""
import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import sys
import textwrap
import tokenize


def respell(name: str, known) -> str:
    """An option name (with or without its leading "--") in the spelling that `known` holds: underscores and
    hyphens inside a name are the same. Unchanged when neither spelling is known."""
    dashes = "--" if name.startswith("--") else ""
    body = name[len(dashes):]
    for other in (body.replace("-", "_"), body.replace("_", "-")):
        if dashes + body not in known and dashes + other in known:
            return dashes + other
    return name


def closest(name: str, known) -> str:
    """", did you mean --x?" for the known option nearest to an unknown `name`, or "" when none is near."""
    match = difflib.get_close_matches(name.lstrip("-"), [k.lstrip("-") for k in known], n=1, cutoff=0.6)
    return f", did you mean --{match[0]}?" if match else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with `respell` applied to each option name given (before any "=value"), which its help
    says."""

    def __init__(self, *args, epilog=None, **kwargs):
        rule = "Option names take underscores or hyphens (--max_new_tokens, --max-new-tokens)."
        super().__init__(*args, epilog=f"{epilog}\n\n{rule}" if epilog else rule, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        known = {s for action in self._actions for s in action.option_strings}
        args = sys.argv[1:] if args is None else list(args)
        out = []
        for arg in args:
            name, eq, value = arg.partition("=")
            out.append(respell(name, known) + eq + value if arg.startswith("--") else arg)
        return super().parse_known_args(out, namespace)


def dataclass_help(cls) -> list[tuple[str, list[tuple[str, object, str]]]]:
    """[(group, [(field, default, help), ...]), ...] read from a config dataclass's source: a field's help is its
    trailing comment and the comment lines right below it; a comment line after a blank line heads a group."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())  # line -> (column, text)
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    fields = {node.lineno: node.target.id for node in ast.parse(source).body[0].body
              if isinstance(node, ast.AnnAssign)}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    groups, help_of = [("options", [])], None
    for n, line in enumerate(lines[1:], start=2):  # numbered as tokenize and ast number them; after "class X:"
        column, text = comments.get(n, (len(line), ""))
        if n in fields:
            help_of = [text] if text else []
            groups[-1][1].append((fields[n], defaults[fields[n]], help_of))
        elif not line[:column].strip() and text:  # a comment alone on its line
            if not lines[n - 2].strip() or n == 2:
                groups.append((text, []))
                help_of = None
            elif help_of is not None:
                help_of.append(text)
        elif not line.strip():
            help_of = None
    return [(group, [(name, default, " ".join(h)) for name, default, h in items]) for group, items in groups if items]
