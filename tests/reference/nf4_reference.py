"""Reference data for tests/nf4_parity.rs: bitsandbytes' 4-bit and 8-bit quantisation on CPU.

    nf4_reference.py OUT_DIR

Writes into OUT_DIR:
  codes.safetensors      nf4_code, fp4_code (get_4bit_type), dynamic_map (create_dynamic_map)
  <group>.safetensors    one input tensor ("input") and, per config key K,
                         K.packed (U8, [ceil(n/2)]), K.absmax (F32, or U8 when nested),
                         K.absmax_raw (F32 absmax before nesting), K.nested_absmax, K.offset ([1]),
                         K.dequant (input dtype) -- from quantize_4bit / dequantize_4bit.
  int8.safetensors       per case C: C.input, C.CB (I8 stored as U8 bytes), C.SCB, C.dequant
  index.json             what is where, the facts checked here, and versions.
index.json is written last: its presence means the run completed.
"""

import json
import logging
import os
import sys
import time

import torch
from safetensors.torch import save_file

import bitsandbytes
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

# bitsandbytes' own odd-shape fallback is torch.compile'd; its recompile notices are noise here.
logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

# The PyTorch formula bitsandbytes falls back to, without its torch.compile wrapper.
_dequant_formula = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
FULL_GRID = [
    (qt, bs, dq) for qt in ("nf4", "fp4") for bs in (32, 64, 128) for dq in (False, True)
]


def key(qt, bs, dq):
    return f"{qt}_bs{bs}_{'dq' if dq else 'plain'}"


def crafted_midpoints():
    """Blocks whose scale is exactly 1 or 2, holding every code midpoint, the f32 values just
    either side of it, zeros of both signs and tiny values around zero."""
    vals = []
    for code in (F.get_4bit_type("nf4", device="cpu"), F.get_4bit_type("fp4", device="cpu")):
        s = torch.sort(code).values
        mids = (s[:-1] + s[1:]) / 2
        up = torch.nextafter(mids, torch.full_like(mids, 2.0))
        down = torch.nextafter(mids, torch.full_like(mids, -2.0))
        for scale in (1.0, 2.0):
            block = torch.cat(
                [
                    torch.tensor([1.0]),
                    mids,
                    up,
                    down,
                    torch.tensor([0.0, -0.0, 1e-6, -1e-6, 1e-30, -1e-30, -1.0, 0.999]),
                ]
            )
            block = torch.cat([block, torch.zeros(64 - block.numel())])
            vals.append(block * scale)
    return torch.cat(vals)


def with_zero_blocks(g):
    """A random tensor whose second block and trailing partial block are all zero."""
    x = torch.randn(64 * 3 + 10, generator=g)
    x[64:128] = 0.0
    x[192:] = 0.0
    return x


def groups():
    """(name, tensor in f32, dtype names, config list)."""
    g = torch.Generator().manual_seed(1234)
    small = [
        ("vec64", torch.randn(64, generator=g)),
        ("odd7x13", torch.randn(7, 13, generator=g)),
        ("m128x64", torch.randn(128, 64, generator=g) * 0.02),
        ("midpoints", crafted_midpoints()),
        ("zeros", with_zero_blocks(g)),
        ("heavy300x20", torch.distributions.StudentT(2.0).sample((300, 20)) * 0.05),
    ]
    for name, x in small:
        yield name, x, ("f32", "f16", "bf16"), FULL_GRID
    yield (
        "m576x576",
        torch.randn(576, 576, generator=g) * 0.03,
        ("f16",),
        [("nf4", 64, True), ("fp4", 128, True), ("nf4", 128, False)],
    )
    yield (
        "m1536x576",
        torch.randn(1536, 576, generator=g) * 0.02,
        ("bf16",),
        [("nf4", 64, True), ("fp4", 64, False)],
    )
    yield (
        "m300x576",
        torch.randn(300, 576, generator=g),
        ("f32",),
        [("nf4", 64, True), ("fp4", 32, True)],
    )


def quantise_case(x, qt, bs, dq):
    """Everything the Rust side compares for one config; also whether bnb's CPU dequantisation
    kernel agrees with the PyTorch formula it replaces."""
    out = {}
    packed, state = F.quantize_4bit(x, blocksize=bs, compress_statistics=dq, quant_type=qt)
    _, raw = F.quantize_4bit(x, blocksize=bs, compress_statistics=False, quant_type=qt)
    assert packed.dtype == torch.uint8 and packed.shape == ((x.numel() + 1) // 2, 1)
    out["packed"] = packed.reshape(-1)
    out["absmax_raw"] = raw.absmax
    if dq:
        out["absmax"] = state.absmax
        out["nested_absmax"] = state.state2.absmax
        out["offset"] = state.offset.reshape(1).float()
        assert state.state2.blocksize == 256
        assert torch.equal(state.state2.code, F.create_dynamic_map(signed=True))
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        out["absmax"] = state.absmax
        absmax = state.absmax
    bnb = F.dequantize_4bit(packed, state).reshape(x.shape)
    formula = _dequant_formula(
        packed.reshape(-1), absmax.float(), state.code, bs, tuple(x.shape), x.dtype
    )
    consistent = torch.equal(bnb, formula)  # == treats -0.0 and +0.0 as equal
    out["dequant"] = formula
    if not consistent:
        out["dequant_bnb_cpu"] = bnb
    return out, consistent


def tie_rule_facts():
    """What bitsandbytes does with values exactly on a midpoint (scale 1, f32)."""
    facts = {}
    for qt in ("nf4", "fp4"):
        code = F.get_4bit_type(qt, device="cpu")
        order = torch.argsort(code)
        s = code[order]
        mids = (s[:-1] + s[1:]) / 2
        packed, _ = F.quantize_4bit(
            torch.cat([torch.tensor([1.0]), mids, torch.zeros(64 - 16)]),
            blocksize=64,
            quant_type=qt,
        )
        q = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)
        got = q[1:16].long()
        lower = order[:-1]
        upper = order[1:]
        # FP4 has two zeros, so its middle midpoint is 0 and either code decodes to zero.
        facts[qt] = {
            "midpoint_codes": got.tolist(),
            "all_to_lower_slot": bool(torch.equal(got, lower)),
            "any_to_upper_slot": bool((got == upper).any() & (lower != upper).any()),
            "sorted_order": order.tolist(),
        }
    return facts


def int8_cases(g):
    ties = torch.zeros(4, 16)
    ties[0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])
    ties[1, :4] = torch.tensor([-3.0, 1.0, 0.5, 2.0])
    # row 2 stays all zero: SCB = 0
    ties[3] = torch.linspace(-1, 1, 16)
    yield "ties_f32", ties
    yield "odd7x13_f32", torch.randn(7, 13, generator=g)
    yield "m128x64_bf16", (torch.randn(128, 64, generator=g) * 0.02).bfloat16()
    yield "m256x576_f16", (torch.randn(256, 576, generator=g) * 0.05).half()
    yield "m64x96_f32", torch.randn(64, 96, generator=g) * 3.0


def int8_reference(out_dir):
    tensors, meta = {}, {}
    g = torch.Generator().manual_seed(99)
    for name, x in int8_cases(g):
        p = bitsandbytes.nn.Int8Params(x.clone(), requires_grad=False).to("cpu")
        cb, scb = p.data, p.SCB
        assert cb.dtype == torch.int8 and scb.dtype == torch.float32
        deq = F.int8_vectorwise_dequant(cb, scb)
        tensors[f"{name}.input"] = x.contiguous()
        tensors[f"{name}.CB"] = cb.view(torch.uint8).contiguous()
        tensors[f"{name}.SCB"] = scb.contiguous()
        tensors[f"{name}.dequant"] = deq.contiguous()
        meta[name] = {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    save_file(tensors, os.path.join(out_dir, "int8.safetensors"))
    return meta


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, "index.json")
    if os.path.exists(index_path):
        os.remove(index_path)
    start = time.time()
    torch.manual_seed(0)

    save_file(
        {
            "nf4_code": F.get_4bit_type("nf4", device="cpu"),
            "fp4_code": F.get_4bit_type("fp4", device="cpu"),
            "dynamic_map": F.create_dynamic_map(signed=True),
        },
        os.path.join(out_dir, "codes.safetensors"),
    )

    index = {"groups": [], "inconsistent_bnb_cpu_dequant": []}
    for name, x32, dtypes, grid in groups():
        for dname in dtypes:
            x = x32.to(DTYPES[dname]).contiguous()
            gname = f"{name}_{dname}"
            tensors = {"input": x}
            configs = []
            for qt, bs, dq in grid:
                k = key(qt, bs, dq)
                case, consistent = quantise_case(x, qt, bs, dq)
                for field, t in case.items():
                    tensors[f"{k}.{field}"] = t.contiguous()
                configs.append(
                    {"key": k, "quant_type": qt, "blocksize": bs, "compress_statistics": dq}
                )
                if not consistent:
                    index["inconsistent_bnb_cpu_dequant"].append(f"{gname}/{k}")
            save_file(tensors, os.path.join(out_dir, f"{gname}.safetensors"))
            index["groups"].append(
                {
                    "name": gname,
                    "file": f"{gname}.safetensors",
                    "shape": list(x.shape),
                    "dtype": dname,
                    "configs": configs,
                }
            )

    index["int8"] = int8_reference(out_dir)
    index["tie_rule"] = tie_rule_facts()
    index["versions"] = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    index["seconds"] = round(time.time() - start, 2)
    total = sum(
        os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir) if f != "index.json"
    )
    index["bytes"] = total
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1)
    print(
        f"nf4_reference: {len(index['groups'])} groups, {total / 1e6:.1f} MB in {index['seconds']}s; "
        f"bnb CPU dequant disagrees with its formula in {len(index['inconsistent_bnb_cpu_dequant'])} cases",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
