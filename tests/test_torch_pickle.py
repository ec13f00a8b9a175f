"""ddpm.torch_pickle against archives that torch wrote (tools/make_torch_pickle_fixtures.py)."""

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ddpm import torch_pickle

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
_NUMPY_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(FIXTURES, "torch_pickle_expected.npz")) as f:
        return dict(f)


def _entries(expected, prefix):
    return {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}


def test_state_dict_matches_torch(expected):
    loaded = torch_pickle.load_state_dict(os.path.join(FIXTURES, "torch_pickle_state_dict.pt"))
    want = _entries(expected, "sd/")
    dtypes = _entries(expected, "sd_dtype/")
    assert list(loaded) == list(want)  # OrderedDict order survives
    for name, array in loaded.items():
        assert array.dtype == np.dtype(_NUMPY_DTYPES[str(dtypes[name])]), name
        assert array.shape == want[name].shape, name
        np.testing.assert_array_equal(array.astype(want[name].dtype), want[name], err_msg=name)
        assert array.flags.c_contiguous and array.flags.writeable, name


def test_views_of_one_storage_do_not_alias():
    loaded = torch_pickle.load_state_dict(os.path.join(FIXTURES, "torch_pickle_state_dict.pt"))
    before = loaded["shared_b"].copy()
    loaded["shared_a"][...] = -1.0
    np.testing.assert_array_equal(loaded["shared_b"], before)


def test_torchscript_params_match_state_dict(expected):
    loaded = torch_pickle.load_torchscript_params(os.path.join(FIXTURES, "torch_pickle_script.pt"))
    want = _entries(expected, "script/")
    # The plain tensor attribute `not_state` must be left out, as in state_dict().
    assert sorted(loaded) == sorted(want)
    for name, array in loaded.items():
        assert array.dtype == want[name].dtype, name
        np.testing.assert_array_equal(array, want[name], err_msg=name)


def test_state_dict_loader_refuses_torchscript():
    with pytest.raises(torch_pickle.UnsafePickleError, match="__torch__"):
        torch_pickle.load_state_dict(os.path.join(FIXTURES, "torch_pickle_script.pt"))


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def _write_archive(path, payload):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        z.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("loader", ["load_state_dict", "load_torchscript_params"])
def test_code_in_pickle_is_refused(tmp_path, loader):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _write_archive(path, {"weight": _Exploit(str(marker))})
    with pytest.raises(torch_pickle.UnsafePickleError, match=r"os\.makedirs|posix\.makedirs"):
        getattr(torch_pickle, loader)(path)
    assert not marker.exists()


def test_os_system_is_refused(tmp_path):
    # Hand-written protocol-0 pickle: GLOBAL os.system, called with a shell command.
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"cos\nsystem\n(Vtouch /tmp/ddpm_pwned\ntR.")
    with pytest.raises(torch_pickle.UnsafePickleError, match=r"os\.system"):
        torch_pickle.load_archive(path)


def test_clear_errors_for_missing_and_non_zip_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        torch_pickle.load_state_dict(tmp_path / "absent.pt")
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a zip archive"):
        torch_pickle.load_state_dict(legacy)
