"""The command line's rules, in one place for every script:

- an option may be spelled with underscores or hyphens (`--max_new_tokens`, `--max-new-tokens`): `respell`, which
  `ArgumentParser` applies to argparse scripts and train.py to its own options;
- train.py's options are its config dataclass's fields, on top of a preset (`parse_dataclass`), and its help is
  their comments (`dataclass_help`, `dataclass_usage`): one source for the code and the help;
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


def parse_dataclass(argv, cls, presets: dict, program: str, description: str = ""):
    """argv -> an instance of the config dataclass cls: --preset=name (a dict of presets) first, then --field=value
    or --field value overrides, each converted to the type of the field's default (a boolean alone means true);
    -h / --help prints dataclass_usage and exits. Names are respelled (`respell`); an unknown one is an error
    naming the closest known one. Errors are ValueErrors of one line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = {"preset", *fields}
    values, overrides, rest = {}, [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("-h", "--help"):
            print(dataclass_usage(cls, presets, program, description))
            sys.exit(0)
        if not arg.startswith("--"):
            raise ValueError(f"options are --name=value or --name value, got {arg!r} ({program} --help lists "
                             f"them)")
        name, eq, value = arg[2:].partition("=")
        name = respell(name, known)
        if name not in known:
            raise ValueError(f"unknown option --{name}{closest(name, known)} ({program} --help lists them)")
        if not eq:  # --name value; a boolean alone (--resume) means true
            flag = name in fields and type(fields[name].default) is bool
            if not rest or rest[0].startswith("--"):
                if not flag:
                    raise ValueError(f"--{name} needs a value: --{name}=VALUE or --{name} VALUE")
                value = "true"
            else:
                value = rest.pop(0)
        if name == "preset":
            if value not in presets:
                raise ValueError(f"unknown preset {value!r}: choose from {', '.join(presets)}")
            values.update(presets[value])
        else:
            overrides.append((name, value))
    for name, value in overrides:
        values[name] = typed(name, value, type(fields[name].default))
    return cls(**values)


def typed(name: str, value: str, kind: type):
    """An option's text as the type of its field's default (bool: true/false/1/0)."""
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--{name} takes true or false, got {value!r}")
        return value.lower() in ("true", "1")
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"--{name} takes a {kind.__name__}, got {value!r}") from None


def dataclass_usage(cls, presets: dict, program: str, description: str = "") -> str:
    """The --help text of parse_dataclass: the command line, the presets, then every field by group, with its
    default and its comment (dataclass_help)."""
    lines = [f"usage: {program} [--preset=NAME] [--name=value | --name value ...]", "",
             description, "",
             "Names take underscores or hyphens (--max_steps, --max-steps); booleans take true/false.", "",
             "--preset=NAME sets these options first (the others override them):"]
    for preset_name, options in presets.items():
        lines += textwrap.wrap(f"{preset_name}: " + ", ".join(f"{n}={v}" for n, v in options.items()), 100,
                               initial_indent="  ", subsequent_indent="    ")
    lines.append("")
    for group, items in dataclass_help(cls):
        lines.append(f"{group}:")
        for name, default, text in items:
            shown = str(default) if len(str(default)) <= 40 else str(default)[:40] + "..."
            option = f"  --{name}={shown}"
            first = f"{option:<34}" if len(option) < 34 else option + "\n" + " " * 34
            lines += textwrap.wrap(text, 100, initial_indent=first, subsequent_indent=" " * 34) or [option]
        lines.append("")
    return "\n".join(lines)
