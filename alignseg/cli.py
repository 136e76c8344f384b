"""The ``alignseg`` command: train, eval, predict, offsets, config, check-data, info.

    alignseg train                                   # the built-in demo: tiny model, synthetic data
    alignseg train --config cityscapes data.root=/data/cityscapes --pretrained resnet101.pth
    torchrun --nproc_per_node=8 -m alignseg train --config cityscapes data.root=...
    alignseg train --resume runs/synthetic-.../checkpoint_0000400.pt train.iterations=800
    alignseg eval --checkpoint runs/.../best.pt --mode slide      # also writes runs/.../best.eval-slide.json
    alignseg eval --checkpoint runs/.../best.pt --mode multiscale eval.tile=null eval.flip=true
    alignseg predict --checkpoint runs/.../best.pt --input photos/ --output predictions/
    alignseg predict --checkpoint best.pt --input cityscapes/leftImg8bit/test --output results/ --format cityscapes
    alignseg offsets --checkpoint runs/.../best.pt --input photo.png --output offsets/
    alignseg config cityscapes data.root=/data/cityscapes         # the resolved config and every key
    alignseg check-data --config cityscapes data.root=/data/cityscapes
    alignseg info alignseg_r101 --size 1024 2048
    alignseg convert cityscapes_ohem.pth alignseg_authors.pt   # the authors' released weights -> a checkpoint
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .api import OUTPUT_FORMATS
from .checkpoint import CheckpointError
from .config import ConfigError, describe_keys, eval_setting, list_presets, load_config
from .evaluation.inference import MODES
from .training.logs import log, setup_logging

EXAMPLES = __doc__.split("\n\n", 1)[1]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alignseg`` console script and ``python -m alignseg``; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(is_main=_is_rank_zero(), verbose=args.verbose)
    if args.backend is not None:
        from .ops import set_backend

        set_backend(args.backend)
    try:
        return args.handler(args) or 0
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        log.error("error: %s", _message(err))
        if args.verbose:
            raise
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except RuntimeError as err:
        from .training.trainer import NonFiniteLossError

        if isinstance(err, NonFiniteLossError):
            log.error("error: %s", err)
            return 3
        raise


# ----------------------------------------------------------------------------------------------
# commands


def _cmd_train(args: argparse.Namespace) -> int:
    from . import distributed as dist_utils
    from .training.trainer import Trainer, config_for_resume

    if args.resume is not None and args.config is not None:
        raise ConfigError(
            "give either --config or --resume: a resumed run takes its config from the checkpoint "
            "(add key=value overrides to change it, e.g. train.iterations=2000)"
        )
    if args.pretrained is not None:
        args.overrides = [*args.overrides, f"model.pretrained={args.pretrained}"]
    if args.resume is not None:
        cfg = config_for_resume(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    ctx = dist_utils.init_distributed(cfg.train.device)
    try:
        results = Trainer(cfg, resume=args.resume, ctx=ctx).fit()
        if ctx.is_main and results is not None:
            print(
                f"final val mIoU {100 * results['miou']:.2f}% ({cfg.eval.mode}) "
                f"after {cfg.train.iterations} iterations"
            )
    finally:
        dist_utils.cleanup_distributed()
    return 0


def _load_for_inference(args: argparse.Namespace):
    """(config, model in eval mode on its device with ``model.info``, distributed context) from ``--checkpoint``
    + overrides, by :func:`alignseg.api.load_model`."""
    from . import api
    from . import distributed as dist_utils

    overrides = [*args.overrides, *([f"eval.mode={args.mode}"] if getattr(args, "mode", None) else [])]
    model = api.load_model(args.checkpoint, device="cpu", overrides=overrides)
    info = model.info
    args.checkpoint_path, args.checkpoint_iteration = Path(info.checkpoint), info.iteration
    ctx = dist_utils.init_distributed(info.config.train.device)
    return info.config, model.to(ctx.device), ctx


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import distributed as dist_utils
    from .builders import build_datasets, dataset_root, evaluate_sharded
    from .evaluation import build_inference_mode
    from .evaluation.report import default_report_path, evaluation_record, write_report

    cfg, model, ctx = _load_for_inference(args)
    setting = build_inference_mode(**eval_setting(cfg))
    target = args.output if args.output is not None else default_report_path(args.checkpoint_path, setting)
    _check_writable_file(target)  # before the evaluation, not after it
    try:
        dataset = build_datasets(cfg, ctx, splits=("val",), convention=model.info.input)["val"]
        log.info("evaluating %d %s images, mode %s", len(dataset), cfg.data.val_split, setting)
        results = evaluate_sharded(model, dataset, cfg, ctx)
        if ctx.is_main:
            print(results.format_table())
            record = evaluation_record(
                results,
                setting,
                checkpoint=str(args.checkpoint_path),
                iteration=args.checkpoint_iteration,
                model=cfg.model.name,
                dataset=cfg.data.dataset,
                data_root=str(dataset_root(cfg)),
                split=cfg.data.val_split,
                num_images=len(dataset),
                input=model.info.input.to_dict(),
            )
            log.info("wrote %s", write_report(target, record))
    finally:
        dist_utils.cleanup_distributed()
    return 0


def _check_writable_file(path: Path) -> None:
    import tempfile

    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give a file name such as {path / 'eval.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}") from None


def _cmd_predict(args: argparse.Namespace) -> int:
    from . import api

    cfg, model, _ = _load_for_inference(args)
    run = api.predict_folder(
        model,
        args.input,
        args.output,
        **eval_setting(cfg),
        alpha=args.alpha,
        output_format=args.format,
        overwrite=args.overwrite,
    )
    return _finish(run, f"predictions in {args.output}")


def _cmd_offsets(args: argparse.Namespace) -> int:
    from . import api

    _, model, _ = _load_for_inference(args)
    run = api.offsets_for_images(model, args.input, args.output, overwrite=args.overwrite)
    return _finish(run, f"offset-field pictures in {args.output}")


def _finish(run, what: str) -> int:
    """Log the summary of a prediction run; exit code 1 when an image failed."""
    if run.failed:
        log.error("%s; %s", what, run.summary())
        return 1
    log.info("%s: %s", what, run.summary())
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(f"# config {args.config or 'synthetic'}{' with ' + ' '.join(args.overrides) if args.overrides else ''}")
    print(cfg.to_yaml(), end="")
    print("\n# override keys (alignseg train ... key=value; values are YAML):")
    for line in describe_keys(cfg):
        print(f"#   {line}")
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from .builders import build_datasets
    from .data import check_dataset

    cfg = load_config(args.config, args.overrides)
    splits = tuple(args.split or ("train", "val"))
    datasets = build_datasets(cfg, splits=splits)
    problems = 0
    for split, dataset in datasets.items():
        report = check_dataset(dataset, name=f"{cfg.data.dataset} {split}", progress=not args.quiet)
        print(report.format())
        problems += len(report.problems)
    if problems:
        log.error("%d problems found; fix or remove those files (or train with data.on_corrupt=skip)", problems)
        return 1
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import models
    from .ops import get_backend
    from .ops.backend import interpreter_enabled, triton_available

    print(
        f"alignseg {__import__('alignseg').__version__}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )
    if triton_available():
        import triton

        print(f"triton {triton.__version__}{' (interpreter: TRITON_INTERPRET=1)' if interpreter_enabled() else ''}")
    else:
        print("triton not installed: the alignment ops run on the eager reference")
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"devices: {', '.join(devices) if devices else 'CPU only'}; alignment ops backend: {get_backend()}")
    print(f"config presets: {', '.join(list_presets())}; models: {', '.join(models.list_models())}")
    print()
    num_classes, size = 19, (512, 1024)
    names = None
    if args.name is not None:
        if args.name in models.list_models():
            names = [args.name]
        else:
            cfg = load_config(args.name)
            names, num_classes = [cfg.model.name], cfg.data.num_classes
            size = tuple(cfg.data.crop_size)
    if args.size is not None:
        size = tuple(args.size)
    if args.num_classes is not None:
        num_classes = args.num_classes
    print(models.format_model_summary(names, num_classes=num_classes, input_size=size))
    return 0


# ----------------------------------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
    from .models.authors import convert_checkpoint

    try:
        summary = convert_checkpoint(args.src, args.dst, num_classes=args.num_classes, config=args.config)
    except FileExistsError as err:
        raise ValueError(str(err)) from None
    print(
        f"wrote {summary['dst']}: {summary['model']} ({summary['options']['depth']} layers, "
        f"{summary['num_classes']} classes) from {summary['keys']} tensors of {args.src} "
        f"(sha256 {summary['sha256'][:12]})\n"
        f"evaluate: alignseg eval --checkpoint {summary['dst']} data.root=/path/to/cityscapes"
    )
    return 0


def _add_convert_command(commands) -> None:
    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint of the authors' code (speedinghzl/AlignSeg) into an alignseg checkpoint",
        description="Read a state_dict saved by the authors' train.py (networks/alignseg.py) and write an alignseg "
        "checkpoint that eval, predict and offsets load. The model computes what their code computes on these "
        "weights (their InPlaceABN scale, head biases and offset units are converted). DST is never overwritten.",
    )
    convert.add_argument("src", help="the authors' checkpoint (.pth)")
    convert.add_argument("dst", help="the alignseg checkpoint to write (.pt); must not exist")
    convert.add_argument("--num-classes", type=int, help="expected number of classes (default: read from the head)")
    convert.add_argument("--config", default="cityscapes",
                         help="config preset or YAML stored with the checkpoint for eval (default: cityscapes)")
    convert.set_defaults(handler=_cmd_convert)


def _message(err: BaseException) -> str:
    """The error's text; for one re-raised from a DataLoader worker, its last line (which names the file)."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignseg",
        description="AlignSeg (feature-aligned segmentation): train, evaluate, predict, inspect.",
        epilog="examples:\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug log lines and full tracebacks")
    parser.add_argument(
        "--backend",
        choices=("auto", "triton", "reference"),
        help="alignment-op implementation (default: $ALIGNSEG_BACKEND or auto = Triton on CUDA, eager on CPU)",
    )
    commands = parser.add_subparsers(dest="command", metavar="command")
    overrides_help = "config overrides key.sub=value, e.g. train.iterations=2000 data.crop_size=[512,512]"

    train = commands.add_parser(
        "train",
        help="train a model (default: the tiny demo on synthetic data)",
        description="Train AlignSeg. Without --config: the built-in demo (tiny model, synthetic data, a few "
        "minutes on a CPU). Under torchrun, trains with DistributedDataParallel.",
        epilog=f"presets: {', '.join(list_presets())}",
    )
    train.add_argument("--config", help="a preset name or a YAML file (default: synthetic)")
    train.add_argument("--resume", help="continue from this checkpoint (or the latest one in this run folder)")
    train.add_argument(
        "--pretrained",
        help="ImageNet backbone weights (a local torchvision-layout ResNet file); same as model.pretrained=PATH",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a checkpoint on its validation set",
        description="Evaluate a checkpoint with its stored config (overrides change it, e.g. data.root=...).",
    )
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    evaluate.add_argument("--mode", choices=MODES, help="inference mode (default: the config's eval.mode)")
    evaluate.add_argument(
        "--output",
        type=Path,
        help="JSON file for the results (default: beside the checkpoint, <name>.eval-<mode>.json)",
    )
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    evaluate.set_defaults(handler=_cmd_eval)

    predict = commands.add_parser(
        "predict",
        help="write colour label maps and overlays for an image or a folder of images",
        description="Predict an image or every image under --input; writes <name>.png "
        "(class ids with a colour palette) "
        "and <name>_overlay.jpg per image, or with --format the files a benchmark server takes. Inputs are never "
        "written; two inputs never share an output name "
        "(scene.jpg and scene.png give scene_jpg.png and scene_png.png); the output folder is not read as input; "
        "an unreadable image is reported and skipped (exit code 1).",
    )
    predict.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    predict.add_argument(
        "--input", required=True, type=Path, help="an image file or a folder of images (subfolders included)"
    )
    predict.add_argument(
        "--output", required=True, type=Path, help="folder to write into (created; not the input folder)"
    )
    predict.add_argument("--overwrite", action="store_true", help="replace output files left by an earlier run")
    predict.add_argument("--mode", choices=MODES, help="inference mode (default: the config's eval.mode)")
    predict.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default="palette",
        help="palette: <name>.png + <name>_overlay.jpg (default); cityscapes: <city>/<city>_<seq>_<frame>_labelIds.png "
        "with Cityscapes label ids from *_leftImg8bit names, for the test server; ade20k: <name>.png, class index + 1",
    )
    predict.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the labels (default 0.5)")
    predict.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    predict.set_defaults(handler=_cmd_predict)

    offsets = commands.add_parser(
        "offsets",
        help="render the learned offset fields of an image as flow-colour pictures",
        description="Run the model on an image and write one flow-colour image per AlignFA/AlignCM module; for a "
        "folder of images, into one subfolder per image.",
    )
    offsets.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    offsets.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    offsets.add_argument("--output", required=True, type=Path, help="folder to write into (created; new or empty)")
    offsets.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    offsets.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    offsets.set_defaults(handler=_cmd_offsets)

    config = commands.add_parser(
        "config",
        help="print the resolved config of a preset or YAML file with overrides, and every override key",
        description="Print the config a command would use (YAML), then each override key with its type and value.",
    )
    config.add_argument("config", nargs="?", help="a preset name or a YAML file (default: synthetic)")
    config.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    config.set_defaults(handler=_cmd_config)

    check = commands.add_parser(
        "check-data",
        help="decode every image and label of a dataset and report each bad file",
        description="Read every image/label pair of the config's dataset (decoding, sizes, label values) with a "
        "progress bar; prints sizes and classes found and one line per bad file. Exit code 1 when any is bad.",
    )
    check.add_argument("--config", help="a preset name or a YAML file (default: synthetic)")
    check.add_argument("--split", action="append", choices=("train", "val"), help="check only this split (repeatable)")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    check.set_defaults(handler=_cmd_check_data)

    info = commands.add_parser(
        "info",
        help="versions, devices, and parameters/MACs of the model presets",
        description="Print versions and devices, then parameters and MACs of a model preset or of a config "
        "preset's model at its crop size (all model presets when no name is given).",
    )
    info.add_argument("name", nargs="?", help="a model name (e.g. alignseg_r101) or a config preset (e.g. cityscapes)")
    info.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default 512 1024, or the preset's crop)"
    )
    info.add_argument("--num-classes", type=int, help="number of classes (default 19, or the preset's)")
    info.set_defaults(handler=_cmd_info)
    _add_convert_command(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
