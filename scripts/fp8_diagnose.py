"""Where `torch._scaled_mm` (rowwise e4m3, rerankd's fp8 path) departs from the arithmetic
on this device: a table for the device run (scripts/device_check.sh), not a test.

For each case (rows aligned to 16 or not, bias fused / added / none, a loud row or not):
the worst relative error of `Fp8Linear` against the exact float64 product of the operands
quantized on the device, and against operands quantized on the CPU; and how many e4m3
values the device's and the CPU's quantization disagree on.

    python scripts/fp8_diagnose.py            # CUDA
    python scripts/fp8_diagnose.py --device cpu
"""

from __future__ import annotations

import argparse
import json

import torch

from rerankd.ops.fp8 import Fp8Linear, exact_product, quantize_rows, worst_relative_error


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows_out = []
    for rows in (37, 48):
        for loud in (False, True):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(rows, 256, generator=gen)
            if loud:
                x[3] *= 100.0
            w, b = torch.randn(128, 256, generator=gen), torch.randn(128, generator=gen)
            x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
            qx_cpu, sx_cpu = quantize_rows(x)
            qw_cpu, sw_cpu = quantize_rows(w)
            qx_dev, sx_dev = quantize_rows(x.to(device))
            differ_x = int((qx_dev.cpu().float() != qx_cpu.float()).sum())
            for mode in ("fused", "added", "none"):
                bias = None if mode == "none" else b.to(device)
                layer = Fp8Linear(w.to(device), bias, fuse_bias=mode == "fused")
                differ_w = int((layer.qweight.cpu().float() != qw_cpu.float()).sum())
                try:
                    got = layer(x.to(device))
                except RuntimeError as exc:
                    rows_out.append({"rows": rows, "loud": loud, "bias": mode, "error": str(exc)})
                    continue
                dev = exact_product(qx_dev, sx_dev, layer.qweight, layer.w_scale.T, bias)
                cpu = exact_product(qx_cpu, sx_cpu, qw_cpu, sw_cpu, bias)
                rows_out.append(
                    {
                        "rows": rows,
                        "loud": loud,
                        "bias": mode,
                        "vs_device_operands": worst_relative_error(got, dev),
                        "vs_cpu_operands": worst_relative_error(got, cpu),
                        "x_values_differ": differ_x,
                        "w_values_differ": differ_w,
                    }
                )
    for row in rows_out:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
