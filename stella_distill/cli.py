"""The `stella-distill` command: precompute, train, export, evaluate, push, run.

Every verb that takes a CONFIG also takes dotted overrides after it (`stages.0.lr=2e-4`).
User mistakes (bad config, missing file, mismatched cache) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from stella_distill import logs
from stella_distill.config import load_config
from stella_distill.errors import UserError, first_line

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stella-distill",
        description="Distil text-embedding teachers into a small student (Jasper/Stella recipe).",
    )
    sub = p.add_subparsers(dest="verb", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("config", help="experiment YAML")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.0.lr=2e-4 data.limit=500")
        return sp

    with_config("precompute", "encode the corpus with every teacher into the on-disk cache")
    with_config("train", "run every training stage (resumes from the newest checkpoint)")
    with_config("run", "precompute -> train -> export -> evaluate, skipping what already finished")
    with_config("check", "load and validate a config, print the resolved fields, do nothing else")

    ex = sub.add_parser("export", help="write a sentence-transformers folder from a run")
    ex.add_argument("run_dir", help="run folder (output_dir of the config) or one checkpoint folder")
    ex.add_argument("--out", required=True, help="export folder")
    ex.add_argument("--dim", type=int, default=None, help="default output dim (export.default_dim)")
    ex.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="also upload to the Hub")
    ex.add_argument("--private", action="store_true", help="create the Hub repo as private")
    ex.add_argument(
        "--layout",
        choices=["per-dim", "single"],
        default=None,
        help="per-dim: also dims/<d>/, a complete folder per offered dim (export.layout, default per-dim)",
    )

    push_help = (
        "send an export folder to the Hub as it is now (card included; each dims/<d> to branch dim-<d>)"
    )
    pu = sub.add_parser("push", help=push_help, description=push_help)
    pu.add_argument("folder", help="export folder")
    pu.add_argument("--repo", required=True, metavar="ORG/NAME", help="Hub model repo (created if missing)")
    pu.add_argument(
        "--revision", default=None, help="branch for the folder (default main; dims: REVISION-dim-<d>)"
    )
    pu.add_argument("--create-pr", action="store_true", help="open pull requests instead of committing")
    pu.add_argument("--private", action="store_true", help="create the Hub repo as private")
    pu.add_argument("--message", default=None, help="commit message")

    ev = sub.add_parser("evaluate", help="score an exported model: STS, retrieval, teacher fidelity")
    ev.add_argument("model_dir", help="sentence-transformers folder (an export)")
    ev.add_argument("--dims", type=int, nargs="*", default=None, help="dims to score (default: all offered)")
    ev.add_argument(
        "--sts",
        nargs="*",
        default=[],
        help="scored sentence pairs: STS-B's tab format, or csv/tsv/jsonl/parquet with sentence1/sentence2/score columns",
    )
    ev.add_argument("--retrieval", nargs="*", default=[], help="BEIR folders")
    ev.add_argument("--cache", default=None, help="teacher cache root (with --config) for fidelity")
    ev.add_argument("--config", default=None, help="experiment YAML (with --cache) for fidelity")
    ev.add_argument("--mteb", nargs="*", default=[], help="MTEB task names (needs the mteb package)")
    ev.add_argument("--batch-size", type=_positive_int, default=64, help="encode batch size")
    for what, example in (("sts", "s2s_query"), ("query", "s2p_query"), ("doc", "")):
        ev.add_argument(
            f"--{what}-prompt-name",
            default=None,
            help=f"prompt of the model for {what} texts{f', e.g. {example}' if example else ''} (default: its default prompt)",
        )
    ev.add_argument("--out", default=None, help="folder for eval.json and the plot (default: MODEL_DIR)")
    for verb in sub.choices.values():  # every verb, so they go after it: `stella-distill train -q CONFIG`
        level = verb.add_mutually_exclusive_group()
        level.add_argument(
            "-q", "--quiet", action="store_true", help="print warnings and errors only; no progress bars"
        )
        level.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="also debug lines, and the libraries' own messages and progress bars (transformers, datasets, hub)",
        )
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _dispatch(args: argparse.Namespace) -> int:
    # Each verb's module is imported when the verb runs: they pull in torch and transformers (seconds
    # of start-up), which `check` and `--help` do without.
    if args.verb == "check":
        cfg = load_config(args.config, args.overrides)
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.verb == "precompute":
        from stella_distill.precompute import run_precompute

        run_precompute(load_config(args.config, args.overrides))
        return 0
    if args.verb == "train":
        from stella_distill.train import train

        train(load_config(args.config, args.overrides))
        return 0
    if args.verb == "run":
        from stella_distill.pipeline import run_all

        run_all(load_config(args.config, args.overrides))
        return 0
    if args.verb == "export":
        from stella_distill.export import export_run

        export_run(
            args.run_dir,
            args.out,
            dim=args.dim,
            repo_id=args.push_to_hub,
            private=args.private,
            layout=args.layout,
        )
        return 0
    if args.verb == "push":
        from stella_distill.export import push_export

        push_export(
            args.folder, args.repo, revision=args.revision, create_pr=args.create_pr, private=args.private,
            commit_message=args.message,
        )  # fmt: skip
        return 0
    if args.verb == "evaluate":
        from stella_distill.evaluate import evaluate_model

        evaluate_model(
            args.model_dir,
            dims=args.dims,
            sts=args.sts,
            retrieval=args.retrieval,
            cache_dir=args.cache,
            config=args.config,
            mteb_tasks=args.mteb,
            batch_size=args.batch_size,
            out_dir=args.out,
            sts_prompt_name=args.sts_prompt_name,
            query_prompt_name=args.query_prompt_name,
            doc_prompt_name=args.doc_prompt_name,
        )
        return 0
    raise AssertionError(args.verb)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `stella-distill` command and of `python -m stella_distill`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    logs.setup(logs.QUIET if args.quiet else logs.VERBOSE if args.verbose else logs.NORMAL)
    try:
        code = _dispatch(args)
        if "torch" in sys.modules:  # only a verb that ran torch can have joined a process group
            from stella_distill.distributed import leave_process_group

            leave_process_group()
        return code
    except UserError as exc:
        print(f"stella-distill {args.verb}: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        # A path the user gave that the system refuses (a name too long, a folder that is a file, no
        # permission ...), reached somewhere no more specific check caught it.
        where = f"{exc.filename}: " if exc.filename is not None else ""
        reason = exc.strerror or first_line(exc)
        print(f"stella-distill {args.verb}: error: {one_line(where + reason)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"stella-distill {args.verb}: interrupted; finished work is kept", file=sys.stderr)
        return 130
    except Exception as exc:
        rank = _lost_peer_rank(exc)
        if rank is None:
            raise
        # Another process of the job stopped (its own error, e.g. a failed write on rank 0, is what
        # the user needs); this one only saw the connection drop in the middle of a collective.
        first = first_line(exc)[:200]
        print(
            f"stella-distill {args.verb}: rank {rank}: another process of this job stopped ({first}); "
            "its error is printed above; finished work is kept",
            file=sys.stderr,
        )
        return 1


MAX_MESSAGE = 1000  # characters of an error line: a message quoting user input is cut, never unbounded


def one_line(message: str) -> str:
    """``message`` as one line of at most ``MAX_MESSAGE`` characters."""
    text = " ".join(message.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 30] + f" ... ({len(text)} characters)"


PEER_LOST = ("closed by peer", "reset by peer", "broken pipe", "connection refused")


def _lost_peer_rank(exc: BaseException) -> int | None:
    """This process's rank when ``exc`` is a collective failing because a peer process went away."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    if torch.distributed.get_world_size() < 2:
        return None
    if isinstance(exc, RuntimeError) and any(k in str(exc).lower() for k in PEER_LOST):
        return torch.distributed.get_rank()
    return None
