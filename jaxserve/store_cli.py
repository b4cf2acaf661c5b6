"""The store's commands, as Ollama's: ``jaxserve create NAME -f Modelfile``, ``list``/``ls``, ``show``
(``--modelfile``, ``--parameters``, ``--system``, ``--template``, ``--license``), ``cp``, ``rm``.
They read and write the store (jaxserve/model_store.py) directly: no server needed.
"""
from __future__ import annotations

import argparse
import datetime
import os

from jaxserve.model_store import MODELS_ENV, ModelStore, StoredModel
from jaxserve.modelfile import ModelfileError, parse_modelfile

_STORE_HELP = f"the store is {MODELS_ENV} (default ~/.jaxserve/models)"


def add_parsers(sub) -> None:
    """Add the store's subcommands to ``sub`` (COMMANDS runs them)."""
    create = sub.add_parser("create", help="create a model from a Modelfile", epilog=_STORE_HELP)
    create.add_argument("name")
    create.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default: ./Modelfile)")
    for name in ("list", "ls"):
        sub.add_parser(name, help="list stored models", epilog=_STORE_HELP)
    show = sub.add_parser("show", help="show a stored model", epilog=_STORE_HELP)
    show.add_argument("name")
    only = show.add_mutually_exclusive_group()
    for part in ("modelfile", "parameters", "system", "template", "license"):
        only.add_argument(f"--{part}", action="store_true", help=f"only its {part}")
    cp = sub.add_parser("cp", help="copy a model", epilog=_STORE_HELP)
    cp.add_argument("source")
    cp.add_argument("destination")
    rm = sub.add_parser("rm", help="remove models", epilog=_STORE_HELP)
    rm.add_argument("names", nargs="+", metavar="name")


def _create(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file)
    with open(path) as f:
        text = f.read()
    try:
        model = ModelStore().create(args.name, parse_modelfile(text), base_dir=os.path.dirname(path))
    except ModelfileError as e:  # "Modelfile:3: PARAMETER temperature needs a number, got 'hot'"
        where = f"{args.file}:{e.line}" if e.line is not None else args.file
        raise ValueError(f"{where}: {e.problem}") from None
    print(f"created {model.name} ({model.id}) from {model.source}")
    print("success")
    return 0


def _list(args: argparse.Namespace, now: datetime.datetime | None = None) -> int:
    rows = [("NAME", "ID", "SIZE", "MODIFIED")]
    rows += [(m.name, m.id, human_bytes(m.size), human_time(_time(m.modified_at), now)) for m in ModelStore().list()]
    print(table(rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    model = ModelStore().get(args.name)
    if args.modelfile:
        print(model.show_modelfile(), end="")
    elif args.parameters:
        print(model.parameters_text())
    elif args.system or args.template:
        print((model.system if args.system else model.template) or "")
    elif args.license:
        print("\n".join(model.license))
    else:
        print(_summary(model))
    return 0


def _cp(args: argparse.Namespace) -> int:
    ModelStore().copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = ModelStore()
    for name in args.names:  # as `ollama rm`: the first one missing stops the rest
        store.delete(name)
        print(f"deleted '{name}'")
    return 0


COMMANDS = {"create": _create, "list": _list, "ls": _list, "show": _show, "cp": _cp, "rm": _rm}


def _summary(model: StoredModel) -> str:
    """`show NAME`: Ollama's indented sections."""
    facts = [("from", model.base), ("source", model.source), ("size", human_bytes(model.size))]
    facts += [("adapter", a) for a in model.adapters]
    facts += [("requires", model.requires)] if model.requires else []
    sections = [("Model", table(facts).splitlines())]
    if model.parameters:
        sections.append(("Parameters", table([line.split(None, 1) for line in
                                              model.parameters_text().splitlines()]).splitlines()))
    if model.system:
        sections.append(("System", model.system.strip("\n").splitlines()))
    if model.messages:
        sections.append(("Messages", [f"{m.role}: {m.content}" for m in model.messages]))
    if model.license:  # the first lines, as Ollama: licenses run long (show --license prints them)
        sections.append(("License", model.license[0].strip("\n").splitlines()[:2]))
    return "\n\n".join(f"  {title}\n" + "\n".join(f"    {line}" for line in lines) for title, lines in sections) + "\n"


def table(rows) -> str:
    """Left-aligned columns four spaces apart or more (Ollama's tables); no trailing spaces."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    return "\n".join("".join(cell.ljust(widths[i] + 4) if i < len(row) - 1 else cell
                             for i, cell in enumerate(row)) for row in rows)


def human_bytes(n: int) -> str:
    """Ollama's format.HumanBytes: decimal units, one decimal below 10 unless whole."""
    for unit, size in (("TB", 1000 ** 4), ("GB", 1000 ** 3), ("MB", 1000 ** 2), ("KB", 1000)):
        if n >= size:
            value = n / size
            return f"{int(value)} {unit}" if value >= 10 or value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def human_time(t: datetime.datetime, now: datetime.datetime | None = None) -> str:
    """Ollama's format.HumanTime: "About a minute ago", "3 days ago", "4 minutes from now"."""
    delta = (now or datetime.datetime.now(datetime.timezone.utc)) - t
    if delta.total_seconds() < 0:
        return f"{_human_duration(-delta)} from now"
    return f"{_human_duration(delta)} ago"


def _human_duration(d: datetime.timedelta) -> str:
    seconds = int(d.total_seconds())
    if seconds < 1:
        return "Less than a second"
    if seconds < 60:
        return "1 second" if seconds == 1 else f"{seconds} seconds"
    minutes = seconds // 60
    if minutes < 60:
        return "About a minute" if minutes == 1 else f"{minutes} minutes"
    hours = round(d.total_seconds() / 3600)
    if hours == 1:
        return "About an hour"
    for limit, per, unit in ((48, 1, "hours"), (24 * 14, 24, "days"), (24 * 60, 24 * 7, "weeks"),
                             (24 * 730, 24 * 30, "months")):
        if hours < limit:
            return f"{hours // per} {unit}"
    return f"{int(d.total_seconds() // (3600 * 24 * 365))} years"


def _time(rfc3339: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
