"""Writes the fixtures for tests/test_torch_pickle.py (needs torch; the tests do not).

Run from the repository root with the tools environment:

    .venv-tools/bin/python tools/make_torch_pickle_fixtures.py

Writes, under tests/fixtures/:
  torch_pickle_state_dict.pt  torch.save of an OrderedDict state dict: many dtypes, a
                              transposed view, offset views sharing one storage, a
                              channels-last tensor, a 0-d and an empty tensor, a Parameter.
  torch_pickle_script.pt      a tiny torch.jit.script module (conv, batch norm, nested
                              Sequential, a registered buffer, a plain tensor attribute).
  torch_pickle_expected.npz   what torch itself reads back: for each state-dict entry
                              `sd/<name>` (bfloat16 stored as float32 plus `sd_dtype/<name>`)
                              and for the script module `script/<name>` from state_dict().
"""

import collections
import os

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.body = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
        self.register_buffer("step", torch.tensor(7, dtype=torch.int64))
        self.not_state = torch.ones(3)  # a plain attribute: not in state_dict()

    def forward(self, x):
        h = self.body(self.conv(x)).mean(dim=(2, 3))
        return self.head(h) + self.not_state.sum() + self.step


def state_dict_fixture() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    shared = torch.arange(20, dtype=torch.float32)
    sd = collections.OrderedDict()
    sd["float32"] = torch.randn(3, 4, generator=g)
    sd["float64"] = torch.randn(5, generator=g, dtype=torch.float64)
    sd["float16"] = torch.randn(2, 3, generator=g).half()
    sd["bfloat16"] = torch.randn(4, generator=g).bfloat16()
    sd["int64"] = torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3)
    sd["int32"] = torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32)
    sd["int8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    sd["uint8"] = torch.tensor([0, 1, 255], dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["transposed"] = base.t()  # stride (1, 5)
    sd["column_slice"] = base[1:5, 2]  # offset 7, stride (5,)
    sd["shared_a"] = shared[3:9].view(2, 3)  # offset 3 into a 20-element storage
    sd["shared_b"] = shared[10:18:2]  # offset 10, stride 2, same storage
    sd["channels_last"] = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 4)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    return sd


def main():
    os.makedirs(OUT, exist_ok=True)
    expected = {}

    sd = state_dict_fixture()
    torch.save(sd, os.path.join(OUT, "torch_pickle_state_dict.pt"))
    for name, tensor in sd.items():
        tensor = tensor.detach()
        expected[f"sd_dtype/{name}"] = np.array(str(tensor.dtype).removeprefix("torch."))
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        expected[f"sd/{name}"] = tensor.numpy()

    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():  # non-default statistics, so they are checked too
        model.body[0].running_mean.uniform_(-1, 1)
        model.body[0].running_var.uniform_(0.5, 2)
    scripted = torch.jit.script(model.eval())
    scripted.save(os.path.join(OUT, "torch_pickle_script.pt"))
    for name, tensor in scripted.state_dict().items():
        expected[f"script/{name}"] = tensor.detach().numpy()

    np.savez(os.path.join(OUT, "torch_pickle_expected.npz"), **expected)
    print(f"wrote {len(expected)} arrays to {OUT}")


if __name__ == "__main__":
    main()
