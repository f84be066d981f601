"""Flash-style multi-head self-attention (work in progress: the launchers are filled in next)."""
MAX_HEAD_DIM = 256


def attention_forward(q, k, v, scale, dropout_p=0.0, seed=None, out=None):
    raise NotImplementedError("the Triton attention kernel is not written yet")


def attention_backward(do, q, k, v, o, lse, scale, dropout_p=0.0, seed=None, dq=None, dk=None, dv=None):
    raise NotImplementedError("the Triton attention kernel is not written yet")
