"""``dwm``: one command line for the whole project. The Justfile recipes are thin wrappers.

    dwm preprocess DIR [key=value ...]
    dwm train [stage=A|B|C] [key=value ...]
    dwm generate music=SONG ref=PHOTO [key=value ...]
    dwm eval ckpt=... data=manifest.json [key=value ...]
    dwm bench [quick=true] [key=value ...]
    dwm models [profile=full]
    dwm demo [videos=DIR]
    dwm app [ckpt=...] [port=7860] [host=127.0.0.1]

Every subcommand takes ``key=value`` overrides of its typed config; ``--help`` lists them all
with their defaults. A bad key or value fails with one line naming it.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import config as C
from .errors import UserFacingError


@dataclass(frozen=True)
class Command:
    summary: str
    config: type
    build: Callable[[list[str]], object]
    target: str  # "module:function", imported only when the command runs
    positional: str | None = None  # config key filled by a bare positional argument


def _plain(cls: type) -> Callable[[list[str]], object]:
    return lambda overrides: C.apply_overrides(cls(), overrides)


COMMANDS: dict[str, Command] = {
    "preprocess": Command("videos -> feature cache + WebDataset shards", C.PreprocessConfig,
                          C.build_preprocess_config, "dwm.preprocess.run:main", "input_dir"),
    "train": Command("train stage A, B, C, or all three in order", C.TrainConfig,
                     C.build_train_config, "dwm.training.train:main"),
    "generate": Command("song + photo -> dance mp4", C.GenerateConfig,
                        lambda overrides: C.build_run_config(C.GenerateConfig, overrides),
                        "dwm.generate.pipeline:main"),
    "eval": Command("metrics of a checkpoint on held-out shards", C.EvalConfig,
                    lambda overrides: C.build_run_config(C.EvalConfig, overrides),
                    "dwm.generate.evaluate:main"),
    "bench": Command("measured speed of the data path and train step", C.BenchConfig,
                     _plain(C.BenchConfig), "dwm.bench:main"),
    "models": Command("download the full weights into models_dir", C.ModelsConfig,
                      _plain(C.ModelsConfig), "dwm.shared.weights:download_main"),
    "demo": Command("the whole chain on a small generated default", C.DemoConfig,
                    _plain(C.DemoConfig), "dwm.generate.demo:main"),
    "app": Command("a local web page: drop a photo and a song, watch the dance", C.AppConfig,
                   _plain(C.AppConfig), "dwm.generate.app:main"),
}


def usage() -> str:
    lines = ["usage: dwm COMMAND [key=value ...]   (dwm COMMAND --help for its options)", ""]
    lines += [f"  {name:<11} {cmd.summary}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def command_help(name: str) -> str:
    cmd = COMMANDS[name]
    pos = f" {cmd.positional.upper()}" if cmd.positional else ""
    lines = [f"usage: dwm {name}{pos} [key=value ...]", "", cmd.summary, "", "options (default):"]
    for key, tp, default in C.describe(cmd.config):
        lines.append(f"  {key:<34} {tp:<28} {default!r}")
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[str, object]:
    """argv (without the program name) -> (command name, config). Raises ConfigError/SystemExit."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0)
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        raise C.ConfigError(f"unknown command '{name}' (one of {', '.join(COMMANDS)})")
    cmd = COMMANDS[name]
    if any(a in ("-h", "--help") for a in args):
        print(command_help(name))
        raise SystemExit(0)
    overrides = []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif cmd.positional and not any(o.startswith(cmd.positional + "=") for o in overrides):
            overrides.append(f"{cmd.positional}={a}")
        else:
            raise C.ConfigError(f"unexpected argument '{a}' (expected key=value)")
    return name, cmd.build(overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        name, cfg = parse(argv)
    except C.ConfigError as e:
        print(f"dwm: error: {e}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name].target.split(":")
    try:
        result = getattr(importlib.import_module(module), func)(cfg)
    except UserFacingError as e:
        print(f"dwm {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # the machine, not the program: disk full, quota, read-only or forbidden path, or a
        # path that is a file where a folder must be (or the reverse). Files are written
        # atomically, so what was written before is intact; a re-run continues.
        print(f"dwm {name}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0) if isinstance(result, int) else 0


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EEXIST,
                       errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


if __name__ == "__main__":
    sys.exit(main())
