"""Command line: ``nni-2ndmatch run|prune|finetune CONFIG.yaml``, ``nni-2ndmatch finetuners``.

Exit codes (``nni_2ndmatch.errors``): 0 success, 2 bad input (config, model or data folder, output
folder), 1 a failed run, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from . import __version__
from .errors import ERRORS, ConfigError, report
from .layout import CHECKPOINT_DIR

# The job's modules (torch, diffusers) are imported by the commands that need them, so that
# --version, --help and argument errors answer at once.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nni-2ndmatch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "the whole job the config describes: prune, finetune, save"),
                            ("prune", "make the student from the teacher (the config's pruning section)"),
                            ("finetune", "finetune the student against its teacher")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML compression config")
        p.add_argument("--resume", action="store_true", help="keep the pruned student already there" if name == "prune"
                       else "continue from the last complete checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--threads", type=int, help="CPU threads for torch (overrides the config's threads; its "
                       "default, auto, leaves half the cores free)")
    p = sub.add_parser("finetuners", help="list the finetuning strategies and their options")
    p.add_argument("names", nargs="*", help="only these strategies (default: all)")
    return parser.parse_args(argv)


def finetuners_text(names: list[str]) -> str:
    """Each strategy (``names``, or all): its name, its summary, then one line per option of the
    finetune section it adds (type, default, meaning). The loop's options are the same for all."""
    import yaml

    from .finetuners import available_finetuners, finetuner_class

    unknown = [n for n in names if n not in available_finetuners()]
    if unknown:
        raise ConfigError([f"{n!r} is not a registered finetuner; allowed: {', '.join(available_finetuners())}"
                           for n in unknown], "command line")
    def as_yaml(value: Any) -> str:  # as the config file writes it
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()

    def allowed(field: Any) -> str:
        if get_origin(field.annotation) is Literal:
            return " | ".join(as_yaml(v) for v in get_args(field.annotation))
        kind = field.annotation.__name__ if isinstance(field.annotation, type) else \
            str(field.annotation).replace("typing.", "").replace("NoneType", "null").replace("None", "null")
        limits = [f"{sign} {getattr(m, attr)}" for m in field.metadata
                  for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if hasattr(m, attr)]
        return ", ".join([kind, *limits])

    blocks = []
    for name in names or available_finetuners():
        cls = finetuner_class(name)
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        lines = [f"{name}: {summary}"]
        for key, field in cls.Options.model_fields.items():
            default = as_yaml(field.get_default(call_default_factory=True))
            lines.append(f"  {key}: {default}  [{allowed(field)}]  {field.description or ''}".rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n\n(the loop's options, such as steps and lr, are every strategy's: docs/cli.md)"


def resume_hint(command: str, config_path: str, output_dir: str, flags: str = "") -> str:
    """What to do after an interrupted run: resume from its last complete checkpoint, if it has one.
    ``flags``: the command line's own (``--threads N``), repeated in the command it suggests."""
    latest = Path(output_dir) / CHECKPOINT_DIR / "latest"
    if latest.is_file():
        return (f"The last complete checkpoint ({latest.read_text().strip()}) is intact; continue with: "
                f"nni-2ndmatch {command} {config_path} --resume{flags}")
    return f"No checkpoint was written yet; start again with: nni-2ndmatch {command} {config_path} --overwrite{flags}"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Take down a launcher's process group before the interpreter does: left to exit, gloo's threads
    could abort the process (SIGABRT, "terminate called without an active exception") after its
    error line, in place of its exit code."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # under a launcher, the others log warnings only
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "finetuners":
        try:
            print(finetuners_text(args.names))
        except ERRORS as e:
            return report(e)
        return 0
    from .config import load_config

    config = None
    try:
        config = load_config(args.config)  # a bad config answers before the job's imports (diffusers)
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError([f"--threads: value {args.threads} is not allowed: it must be >= 1"], "command line")
            config = config.model_copy(update={"threads": args.threads})
        from .job.run import run_job, summary_text

        summary = run_job(config, args.command, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.no_progress)
    except ERRORS as e:
        return report(e)
    except KeyboardInterrupt:
        flags = (f" --threads {args.threads}" if args.threads is not None else "") + \
            (" --no-progress" if args.no_progress else "")
        hint = resume_hint(args.command, args.config, config.output_dir, flags) if config is not None else ""
        if hint and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            hint += " (under the same launcher, e.g. accelerate launch --num_processes N -m nni_2ndmatch.cli ...)"
        if main_process:  # one hint from a multi-process run
            print(f"\ninterrupted. {hint}".rstrip(), file=sys.stderr)
        return 130
    if main_process:  # one summary from a multi-process run
        print(summary_text(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
