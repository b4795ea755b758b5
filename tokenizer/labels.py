"""The label that takes no loss, shared by the data that writes labels and the losses that
read them.

It lives here, in the bottom package, because two packages that may not import each other
need it: `data/` writes it (prompt tokens, padding, the last position of a block) and may
import only `tokenizer/`; `kernels/` skips it in the cross-entropy. One constant taken from
the package everything else already sits on adds no cycle and keeps every arrow pointing
down, where a copy in each package could drift apart.
"""

# PyTorch's default `ignore_index` of `F.cross_entropy`, which Hugging Face's labels use too.
IGNORE_INDEX = -100
