"""The roofline table of bench/README.md: bytes, FLOPs and the H100 floor time of each op at each shape.

``python -m bench.roofline`` prints it as Markdown; ``--write`` replaces the table between the
markers in bench/README.md, so the README never holds numbers worked out by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.shapes import MODES, floor_time_us, flops, min_bytes, model_cases, upsampled_map_bytes

H100_COPY_GBS = 3000.0  # device-to-device copy bandwidth measured on an H100 (bytes read + written)
README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- roofline:begin (python -m bench.roofline --write) -->", "<!-- roofline:end -->"
ELEMENT_BYTES = {"bf16": 2, "fp32": 4}


def roofline_markdown(bandwidth_gbs: float = H100_COPY_GBS) -> str:
    lines = [
        f"Floor = minimum bytes / {bandwidth_gbs / 1000:.1f} TB/s. FLOP/byte is for bf16 (halve it for fp32). "
        "The minimum bytes are those of the fused ops (align_fa exact and one-step alike: no upsampled map); "
        "+U MB bf16 is what the authors' chain moves on top for its stored upsampled map.",
        "",
        "| setting | op stage | shape N x C x H x W <- h x w | mode | MB bf16 | MB fp32 | +U MB bf16 | GFLOP | "
        "FLOP/byte | floor us bf16 | floor us fp32 |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for case in model_cases():
        for mode in MODES:
            b16, b32 = (min_bytes(case, mode, ELEMENT_BYTES[d]) for d in ("bf16", "fp32"))
            f = flops(case, mode)
            lines.append(
                f"| {case.setting} | {case.op} {case.stage} | {case.shape_text} | {mode} | {b16 / 1e6:.1f} | "
                f"{b32 / 1e6:.1f} | {upsampled_map_bytes(case, mode, 2) / 1e6:.1f} | {f / 1e9:.2f} | {f / b16:.2f} | "
                f"{floor_time_us(case, mode, 2, bandwidth_gbs):.1f} | "
                f"{floor_time_us(case, mode, 4, bandwidth_gbs):.1f} |"
            )
    return "\n".join(lines)


def write_readme(table: str, readme: Path = README) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} lacks the markers {BEGIN!r} and {END!r} around the roofline table")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=H100_COPY_GBS, help="copy bandwidth for the floor (GB/s)"
    )
    parser.add_argument("--write", action="store_true", help=f"replace the table in {README.name}")
    args = parser.parse_args(argv)
    table = roofline_markdown(args.bandwidth_gbs)
    if args.write:
        write_readme(table)
        print(f"roofline table written to {README}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
