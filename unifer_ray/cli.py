"""The `unifer` command: FER with multimodal LLMs on Ray — data, FERBench, curation, SFT, RLVR, serving.

Every stage reads its settings from a YAML config file (`--config`); without one it uses the package's
configs/tiny.yaml, the demo's settings. `unifer <command> --help` shows each command's options and an example."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

from unifer_ray.stages import STAGES


def _convert(args: argparse.Namespace) -> None:
    from unifer_ray.data.convert import convert_ferbench, convert_hf_ferbench
    from unifer_ray.data.hf_source import HFSource

    if args.hf is None:
        if args.dataset not in LAYOUT_DATASETS:
            raise ValueError(f"--dataset {args.dataset!r} with --root: expected one of {list(LAYOUT_DATASETS)}")
        report = convert_ferbench(args.dataset, args.root, args.out, split=args.split, path_prefix=args.path_prefix,
                                  image_out=args.image_out)
    else:
        source = HFSource(path=args.hf, split=args.split, dataset=args.dataset, name=args.hf_name,
                          revision=args.hf_revision, image_column=args.image_column, label_column=args.label_column,
                          labels=tuple(args.labels) if args.labels else None, label_map=_label_map(args.label_map))
        report = convert_hf_ferbench(source, args.out, path_prefix=args.path_prefix, image_out=args.image_out)
    print(json.dumps(report, indent=2, default=str))


def _label_map(pairs: list[str] | None) -> dict[str, str]:
    """`--label-map Happy=happiness 3=anger` as a mapping."""
    mapping = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--label-map {pair!r}: expected DATASET_LABEL=OUR_LABEL")
        mapping[key] = value
    return mapping


def _export(args: argparse.Namespace) -> None:
    from unifer_ray.data.hf_export import export_results, export_training_set

    if args.what == "results":
        if len(args.from_) != 1:
            raise ValueError("unifer export results takes one benchmark out_dir (--from)")
        report = export_results(args.from_[0], args.out)
    else:
        report = export_training_set(args.what, args.from_ if len(args.from_) > 1 else args.from_[0], args.out)
    print(json.dumps(report, indent=2, default=str))


def _synth(args: argparse.Namespace) -> None:
    from unifer_ray.data.synthetic import write_synthetic_datasets

    summary = write_synthetic_datasets(args.out, train_per_class=args.train_per_class,
                                       test_per_class=args.test_per_class, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))


def _build_tiny(args: argparse.Namespace) -> None:
    from unifer_ray.models.tiny import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))


def _bench_run(args: argparse.Namespace) -> None:
    from unifer_ray.bench.config import BenchConfig
    from unifer_ray.bench.job import bench_and_score
    from unifer_ray.config import load_config
    from unifer_ray.ray_runtime import init_ray

    config = load_config(args.config, BenchConfig, section=args.section)
    init_ray()
    bench_and_score(config, mode=args.mode)


def _bench_score(args: argparse.Namespace) -> None:
    from unifer_ray.bench.report import leaderboard_text, score_files

    metrics = score_files(args.results, mode=args.mode, out_dir=args.out, model_names=args.model)
    print(leaderboard_text(metrics))
    print(f"report: {args.out}")


def _curate(args: argparse.Namespace) -> None:
    from unifer_ray.curate.run import curate_from_file

    stats = curate_from_file(args.what, args.config, section=args.section)
    print(json.dumps(stats, indent=2, default=str))


def _rlvr(args: argparse.Namespace) -> None:
    from unifer_ray.config import load_config
    from unifer_ray.ray_runtime import init_ray
    from unifer_ray.rl.config import RLVRConfig
    from unifer_ray.rl.controller import run_rlvr

    config = load_config(args.config, RLVRConfig, section=args.section)
    init_ray()
    result = run_rlvr(config, resume=args.resume)
    print(f"RLVR: {result.steps} steps, policy version {result.policy_version}, {result.seconds:.1f}s; "
          f"model: {result.model_dir}; metrics: {result.metrics_path}")


def _sft(args: argparse.Namespace) -> None:
    from unifer_ray.config import load_config
    from unifer_ray.ray_runtime import init_ray
    from unifer_ray.train.config import SFTConfig
    from unifer_ray.train.sft import run_sft

    config = load_config(args.config, SFTConfig, section=args.section)
    init_ray()
    result = run_sft(config)
    print(f"SFT: {result.steps} steps, loss {result.loss:.4f}, {result.seconds:.1f}s; model: {result.model_dir}; "
          f"metrics: {result.metrics_path}")


def _pipeline(args: argparse.Namespace) -> None:
    from unifer_ray.pipeline import run_pipeline_file

    run_pipeline_file(args.config, stages=args.stages)


def _serve(args: argparse.Namespace) -> None:
    from unifer_ray.serve.run import serve_model

    serve_model(args.model, args.config)


def _demo(args: argparse.Namespace) -> None:
    from unifer_ray.demo import run_demo

    run_demo(args.config, args.out)


CONFIG_HELP = "the YAML config file (default: the package's configs/{name})"


def _command(sub, name: str, summary: str, example: str, func=None) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does and shows one way to run it."""
    parser = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def _add_config(parser: argparse.ArgumentParser, default: str | None, section: str | None = None) -> None:
    from unifer_ray.config import packaged_config

    if default is None:
        parser.add_argument("--config", required=True, help="the YAML config file")
    else:
        parser.add_argument("--config", default=str(packaged_config(default)), help=CONFIG_HELP.format(name=default))
    if section is not None:
        parser.add_argument("--section", default=section, help=f"the config file's section (default: {section})")


LAYOUT_DATASETS = ("rafdb", "ferplus", "affectnet", "sfew")


def _add_hf_options(parser: argparse.ArgumentParser) -> None:
    """The options of a Hugging Face dataset source (`--hf`), the same wherever a command takes a source."""
    hf = parser.add_argument_group("Hugging Face dataset (--hf)")
    hf.add_argument("--hf-name", default=None, help="the dataset's configuration name")
    hf.add_argument("--hf-revision", default=None, help="a hub dataset's branch, tag or commit")
    hf.add_argument("--image-column", default="image", help="the column of the images (default: image)")
    hf.add_argument("--label-column", default="label", help="the column of the labels (default: label)")
    hf.add_argument("--labels", nargs="+", default=None,
                    help="the candidate labels, in order (default: the dataset's label set, or the ClassLabel names)")
    hf.add_argument("--label-map", nargs="+", default=None, metavar="NAME=LABEL",
                    help="map a label name or id of the dataset to a candidate label (default: by name, any case)")


def _data_commands(sub) -> None:
    convert = _command(sub, "convert", "convert datasets",
                       "unifer convert ferbench --dataset rafdb --root data/RAF-DB --out ferbench/rafdb_qa.json")
    fb = _command(convert.add_subparsers(dest="what", required=True), "ferbench",
                  "a dataset in its original layout or a Hugging Face dataset -> FERBench items (JSON)",
                  "unifer convert ferbench --dataset rafdb --root data/RAF-DB --out ferbench/rafdb_qa.json\n"
                  "  unifer convert ferbench --dataset rafdb --hf data/rafdb_hf --out ferbench/rafdb_qa.json",
                  _convert)
    fb.add_argument("--dataset", required=True,
                    help=f"one of {', '.join(LAYOUT_DATASETS)} (its label set); with --hf also a new dataset's name")
    where = fb.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", help="the dataset's root directory, in its original layout")
    where.add_argument("--hf", metavar="PATH_OR_ID",
                       help="a Hugging Face dataset: saved with save_to_disk, a parquet/arrow folder, an imagefolder "
                       "tree or a hub id (docs/huggingface.md)")
    fb.add_argument("--out", required=True, help="the FERBench JSON file to write")
    fb.add_argument("--split", default="test")
    fb.add_argument("--path-prefix", default=None, help="prefix of image_path (default: /<dataset dir name>)")
    fb.add_argument("--image-out", default=None,
                    help="where images held as bytes are written (default: --root; with --hf: <out dir>/<dataset dir>)")
    _add_hf_options(fb)

    export = _command(sub, "export", "write a curated set or FERBench results as a Hugging Face dataset",
                      "unifer export cot --from runs/demo/curate/cot/items --out runs/hf/unifer-cot")
    exports = export.add_subparsers(dest="what", required=True)
    for what, text, example in (
        ("cot", "the CoT set (items files or directories)", "runs/demo/curate/cot/items"),
        ("rlvr", "the RLVR set (items files or directories)", "runs/demo/curate/rlvr/items"),
        ("results", "the FERBench results of a benchmark run (its out_dir)", "runs/demo/bench"),
    ):
        p = _command(exports, what, f"{text} -> parquet shards and a dataset card, ready for push_to_hub",
                     f"unifer export {what} --from {example} --out runs/hf/{what}", _export)
        p.add_argument("--from", dest="from_", nargs="+", required=True, help=text)
        p.add_argument("--out", required=True, help="the dataset directory to write (local or s3://)")

    synth = _command(sub, "synth", "render the four synthetic datasets in their original layouts",
                     "unifer synth --out runs/data --train-per-class 50 --test-per-class 10", _synth)
    synth.add_argument("--out", required=True)
    synth.add_argument("--train-per-class", type=int, default=50)
    synth.add_argument("--test-per-class", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)

    tiny = _command(sub, "build-tiny", "build the tiny random-init Qwen2.5-VL model",
                    "unifer build-tiny --out runs/models/tiny", _build_tiny)
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)


def _bench_commands(sub) -> None:
    bench = _command(sub, "bench", "FERBench: benchmark models, score result files",
                     "unifer bench run --config configs/ferbench.yaml").add_subparsers(dest="what", required=True)
    run = _command(bench, "run", "benchmark models on FERBench files with Ray Data, then score and report",
                   "unifer bench run --config configs/ferbench.yaml --mode paper", _bench_run)
    _add_config(run, None)
    run.add_argument("--section", default=None, help="the config file's section holding the bench config")
    run.add_argument("--mode", choices=["strict", "paper"], default="strict")
    score = _command(bench, "score", "score result files (ours or the reference format)",
                     "unifer bench score --results rafdb_unifer_7b_results.json --mode paper --out report",
                     _bench_score)
    score.add_argument("--results", nargs="+", required=True)
    score.add_argument("--mode", choices=["strict", "paper"], default="strict")
    score.add_argument("--out", required=True)
    score.add_argument("--model", nargs="*", default=None, help="model names for reference-format files")


def _training_commands(sub) -> None:
    curate = _command(sub, "curate", "curate training sets with Ray Data",
                      "unifer curate cot --config configs/tiny.yaml")
    curate_sets = curate.add_subparsers(dest="what", required=True)
    for what, text in (("cot", "the chain-of-thought SFT set"), ("rlvr", "the verifiable-answer RL set")):
        p = _command(curate_sets, what, f"curate {text}", f"unifer curate {what} --config configs/tiny.yaml", _curate)
        _add_config(p, "tiny.yaml", section=f"curate_{what}")

    sft = _command(sub, "sft", "cold-start SFT on the CoT set with Ray Train (DeepSpeed or DDP)",
                   "unifer sft --config configs/tiny.yaml --section sft", _sft)
    _add_config(sft, "tiny.yaml", section="sft")

    rlvr = _command(sub, "rlvr", "GRPO with rollout and learner actors exchanging weights",
                    "unifer rlvr --config configs/tiny.yaml --resume", _rlvr)
    _add_config(rlvr, "tiny.yaml", section="rlvr")
    rlvr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")


def _pipeline_commands(sub) -> None:
    pipeline = _command(sub, "pipeline", "curate -> SFT -> RLVR -> FERBench -> Serve from one config file",
                        "unifer pipeline --config configs/qwen2_5_vl_7b.yaml --stages sft rlvr bench", _pipeline)
    _add_config(pipeline, "tiny.yaml")
    pipeline.add_argument("--stages", nargs="+", default=None, choices=STAGES,
                          help="run only these stages (default: the file's pipeline.stages)")

    serve = _command(sub, "serve", "serve a model (OpenAI-compatible + /v1/fer) with Ray Serve; Ctrl-C stops",
                     "unifer serve --model runs/demo/models/tiny-rlvr", _serve)
    serve.add_argument("--model", default=None,
                       help="a model directory, s3:// prefix or hub id (default: the config's)")
    _add_config(serve, "serve.yaml")

    deploy = _command(sub, "serve-config", "a Serve config file for `serve deploy`, with $api_key_env's SHA-256 "
                      "in place of the variable (the cluster never needs the key)",
                      "UNIFER_API_KEY=... unifer serve-config configs/serve_gpu.yaml --out serve_gpu.deploy.yaml",
                      _serve_config)
    deploy.add_argument("config", help="a Serve config file whose application names api_key_env")
    deploy.add_argument("--out", default=None, help="write here (default: stdout)")

    demo = _command(sub, "demo", "the whole system on the embedded default (CPU, synthetic faces)",
                    "unifer demo --out runs/demo", _demo)
    _add_config(demo, "tiny.yaml")
    demo.add_argument("--out", default="runs/demo", help="every runs/demo path of the config moves below this")


def _serve_config(args: argparse.Namespace) -> None:
    import yaml

    from unifer_ray.serve.config import deploy_file

    text = yaml.safe_dump(deploy_file(args.config), sort_keys=False)
    if args.out is None:
        print(text, end="")
        return
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}: the API key's SHA-256 in place of its variable; deploy it with `serve deploy {args.out}`")


def _version() -> str:
    try:
        return version("unifer-ray")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unifer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_data_commands, _bench_commands, _training_commands, _pipeline_commands):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("unifer_ray").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    from unifer_ray.config import ConfigError

    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"unifer: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
