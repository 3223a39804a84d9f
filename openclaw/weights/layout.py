"""How quantized weights are stored, in numbers: one weight's Layout (bits, group, offsets, code table, zero code) and
its bytes, the group the loader quantizes 8-bit tables to, and the layouts of the manifest's formats and of a
config.json quantization_config. A leaf: sizes, the GGUF reader and the loader share it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """How one quantized weight is stored (kernels/qlinear.py): bits per code, group, offsets, a 16-entry lut, the
    zero code (QuantWeight.layout's fields). The zero costs no bytes, but parts of different layouts are not fused."""

    bits: int
    group: int
    offsets: bool
    lut: bool
    zero: int = 0

    def nbytes(self, n: int, k: int) -> int:
        groups = n * (k // self.group)
        return n * k * self.bits // 8 + groups * 2 * (1 + self.offsets) + 64 * self.lut


def rtn_group(k: int) -> int:
    """The group of weights the loader quantizes itself (8-bit embeddings / lm_head): 128, or the largest power of
    two from 64 down to 16 that divides K, else K."""
    return next((g for g in (128, 64, 32, 16) if k % g == 0), k)


def eight_bit(k: int) -> Layout:
    """Embeddings, lm_head and anything a quantized checkpoint leaves in full precision."""
    return Layout(8, rtn_group(k), True, False)


NF4 = Layout(4, 64, False, True)  # bitsandbytes' NF4, what --quantize nf4 makes of full-precision linear layers
# manifest formats whose linear layers load quantized, and their layout (others load in the model dtype)
FORMAT_LAYOUTS = {"awq-int4": Layout(4, 128, True, False), "bnb-nf4": NF4, "bf16->nf4": NF4,
                  "gguf-q4_1": Layout(4, 32, True, False)}


def config_layout(raw: dict) -> Layout | None:
    """The layout of a checkpoint's linear layers from config.json's quantization_config (None: unquantized)."""
    qc = raw.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "?")).lower()
    if method == "bitsandbytes":
        return Layout(4, int(qc.get("bnb_4bit_blocksize", 64)), False, qc.get("bnb_4bit_quant_type", "nf4") == "nf4")
    return Layout(int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128))),
                  bool(qc.get("zero_point", True)), False)
