"""Train a GPT with npgpt.   python train.py [--preset tiny|small|lecture] [flags]   (--help)"""
import sys

from npgpt.cli import run_cli
from npgpt.trainconfig import build_parser, config_from_args, given_flags
from npgpt.training import Trainer


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    trainer = Trainer(cfg, resume=args.resume, overrides=given_flags(args))
    summary = trainer.run()
    if summary["val_loss"] is not None:
        print(f"done: iteration {summary['iter']}, train loss {summary['train_loss']:.4f}, "
              f"val loss {summary['val_loss']:.4f}, {summary['elapsed_s']:.1f} s of training; "
              f"checkpoint {trainer.ckpt_path}")
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
