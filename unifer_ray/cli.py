"""The `unifer` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _convert(args: argparse.Namespace) -> None:
    from unifer_ray.data.convert import convert_ferbench

    report = convert_ferbench(args.dataset, args.root, args.out, split=args.split, path_prefix=args.path_prefix)
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
    from unifer_ray.bench.pipeline import bench_and_score
    from unifer_ray.config import load_config
    from unifer_ray.ray_utils import init_ray

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
    from unifer_ray.ray_utils import init_ray
    from unifer_ray.rl.config import RLVRConfig
    from unifer_ray.rl.controller import run_rlvr

    config = load_config(args.config, RLVRConfig, section=args.section)
    init_ray()
    result = run_rlvr(config, resume=args.resume)
    print(result)


def _sft(args: argparse.Namespace) -> None:
    from unifer_ray.config import load_config
    from unifer_ray.ray_utils import init_ray
    from unifer_ray.train.config import SFTConfig
    from unifer_ray.train.sft import run_sft

    config = load_config(args.config, SFTConfig, section=args.section)
    init_ray()
    print(run_sft(config))


def _pipeline(args: argparse.Namespace) -> None:
    from unifer_ray.pipeline import run_pipeline_file

    run_pipeline_file(args.config, stages=args.stages)


def _serve(args: argparse.Namespace) -> None:
    from unifer_ray.serve.run import DEFAULT_SERVE_CONFIG, serve_model

    serve_model(args.model, args.config or DEFAULT_SERVE_CONFIG)


def _demo(args: argparse.Namespace) -> None:
    from unifer_ray.demo import run_demo

    run_demo(args.config, args.out)


def build_parser() -> argparse.ArgumentParser:
    from unifer_ray.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="unifer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert datasets").add_subparsers(dest="what", required=True)
    fb = convert.add_parser("ferbench", help="a dataset in its original layout -> FERBench items (JSON)")
    fb.add_argument("--dataset", required=True, choices=["rafdb", "ferplus", "affectnet", "sfew"])
    fb.add_argument("--root", required=True, help="the dataset's root directory")
    fb.add_argument("--out", required=True, help="the FERBench JSON file to write")
    fb.add_argument("--split", default="test")
    fb.add_argument("--path-prefix", default=None, help="prefix of image_path (default: /<dataset dir name>)")
    fb.set_defaults(func=_convert)

    synth = sub.add_parser("synth", help="render the four synthetic datasets in their original layouts")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train-per-class", type=int, default=50)
    synth.add_argument("--test-per-class", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)

    tiny = sub.add_parser("build-tiny", help="build the tiny random-init Qwen2.5-VL model")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_build_tiny)

    bench = sub.add_parser("bench", help="FERBench").add_subparsers(dest="what", required=True)
    run = bench.add_parser("run", help="benchmark models on FERBench files with Ray Data")
    run.add_argument("--config", required=True)
    run.add_argument("--section", default=None, help="the config file's section holding the bench config")
    run.add_argument("--mode", choices=["strict", "paper"], default="strict")
    run.set_defaults(func=_bench_run)
    score = bench.add_parser("score", help="score result files (ours or the reference format)")
    score.add_argument("--results", nargs="+", required=True)
    score.add_argument("--mode", choices=["strict", "paper"], default="strict")
    score.add_argument("--out", required=True)
    score.add_argument("--model", nargs="*", default=None, help="model names for reference-format files")
    score.set_defaults(func=_bench_score)

    curate = sub.add_parser("curate", help="curate training sets with Ray Data").add_subparsers(dest="what", required=True)
    for what, text in (("cot", "the chain-of-thought SFT set"), ("rlvr", "the verifiable-answer RL set")):
        p = curate.add_parser(what, help=text)
        p.add_argument("--config", required=True)
        p.add_argument("--section", default=None, help=f"the config file's section (default: curate_{what})")
        p.set_defaults(func=_curate)

    sft = sub.add_parser("sft", help="cold-start SFT on the CoT set with Ray Train (DeepSpeed or DDP)")
    sft.add_argument("--config", required=True)
    sft.add_argument("--section", default="sft")
    sft.set_defaults(func=_sft)

    rlvr = sub.add_parser("rlvr", help="GRPO with rollout and learner actors exchanging weights")
    rlvr.add_argument("--config", required=True)
    rlvr.add_argument("--section", default="rlvr")
    rlvr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    rlvr.set_defaults(func=_rlvr)

    pipeline = sub.add_parser("pipeline", help="curate -> SFT -> RLVR -> FERBench -> Serve from one config file")
    pipeline.add_argument("--config", required=True)
    pipeline.add_argument("--stages", nargs="+", default=None,
                          choices=STAGES,
                          help="run only these stages (default: the file's pipeline.stages)")
    pipeline.set_defaults(func=_pipeline)

    serve = sub.add_parser("serve", help="serve a model (OpenAI-compatible + /v1/fer) with Ray Serve; Ctrl-C stops")
    serve.add_argument("--model", default=None, help="a model directory or s3:// prefix (default: the config's)")
    serve.add_argument("--config", default=None, help="a Serve config file (default: configs/serve.yaml)")
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="the whole system on the embedded default (CPU, synthetic faces)")
    demo.add_argument("--config", default=None, help="default: configs/tiny.yaml settings built in")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=_demo)
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
