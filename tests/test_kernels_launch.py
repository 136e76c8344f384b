"""Launch mechanics the interpreter cannot show: the CUDA device guard, 64-bit channel offsets, and the tiles'
orientation against the installed compiler's layouts."""

import contextlib
import inspect
import os
import re

import pytest
import torch

from alignseg.ops.backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

if triton_available():
    import triton
    import triton.language as tl

    from alignseg.kernels.bilinear import channel_offset

    @triton.jit
    def store_channel_offsets(out_ptr, stride_c):
        tl.store(out_ptr, channel_offset(3, stride_c))
        tl.store(out_ptr + 1, channel_offset(1, stride_c))


class RecordingKernel:
    """Stands in for a @triton.jit function: records the device that is current when it launches."""

    def __init__(self, current):
        self.current = current
        self.launched_on = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched_on = self.current[-1]

        return launch


def test_a_launch_runs_under_the_cuda_device_of_its_tensors(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from alignseg.kernels.launch import KernelLaunch

    current = ["cuda:0"]

    @contextlib.contextmanager
    def fake_cuda_device(device):
        current.append(str(device))
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with FakeTensorMode():  # CUDA tensors without a GPU
        tensor = torch.empty(2, 3, device="cuda:1")
    kernel = RecordingKernel(current)
    KernelLaunch(kernel, grid=(1,), args=(tensor, 3), constexprs={}, num_warps=4)()
    assert kernel.launched_on == "cuda:1" and current == ["cuda:0"]

    KernelLaunch(kernel, grid=(1,), args=(torch.empty(2), 3), constexprs={}, num_warps=4)()
    assert kernel.launched_on == "cuda:0"  # CPU tensors (the interpreter): no guard


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_run_on_the_second_gpu_while_the_first_is_current():
    from alignseg.ops import align_fa, align_fa_reference

    low = torch.randn(2, 8, 9, 11, device="cuda:1", requires_grad=True)
    high = torch.randn(2, 8, 5, 6, device="cuda:1", requires_grad=True)
    offsets = torch.randn(2, 4, 9, 11, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        out = align_fa(low, high, offsets)
        out.sum().backward()
    torch.testing.assert_close(out, align_fa_reference(low, high, offsets))
    assert low.grad.device == torch.device("cuda:1")


def test_channel_offset_is_a_64_bit_product():
    # index * stride_c in int32 wraps once a map has over 2**31 / index pixels (MAX_PIXELS allows it); the
    # interpreter wraps int32 like a GPU does, so a stride of 2**30 shows it without allocating 12 GB.
    out = torch.zeros(2, dtype=torch.int64)
    store_channel_offsets[(1,)](out, 2**30)
    assert out.tolist() == [3 * 2**30, 2**30]


def test_no_kernel_multiplies_a_channel_stride_in_32_bits():
    # Structural: every multiple of a channel stride goes through channel_offset or an int64 channel vector.
    from alignseg.kernels import align_cm, align_fa, align_fa_gather, bilinear, fixed_point

    # ``channels`` is always an int64 vector (program id cast before the arange is added).
    allowed = re.compile(r"channels(\[None, :\])? \* \w*stride_c|channel_offset\(\w+, \w*stride_c\)"
                         r"|index \* tl\.cast\(stride_c")
    for module in (align_fa, align_cm, align_fa_gather, bilinear, fixed_point):
        for number, line in enumerate(inspect.getsource(module).splitlines(), 1):
            code = re.sub(r"``.*?``", "", line.split("#")[0])  # docstrings quote code in double backquotes
            for product in re.findall(r"[\w\]\)]+ \* \w*stride_c\b|\w*stride_c \* \w+", code):
                assert allowed.search(code), (f"{module.__name__}:{number}: 32-bit product {product!r}: "
                                              "use channel_offset")


def test_every_kernel_is_planned_so_the_compile_matrix_sees_it():
    # Only the AOT matrix (tests/test_kernels_compile.py) compiles real code; the interpreter runs Python and
    # accepts what Triton's compiler refuses (the window reduction read a plain global: it failed on the first GPU).
    from alignseg.kernels import align_cm, align_fa, align_fa_gather, fixed_point, report

    def name(kernel) -> str:
        return getattr(kernel, "fn", kernel).__name__

    defined = {name(obj) for module in (align_fa, align_cm, align_fa_gather, fixed_point)
               for attr, obj in vars(module).items()
               if attr.endswith("_kernel") and hasattr(obj, "fn")}
    planned = {name(launch.kernel) for _, launch in report.example_plans(torch.float32, torch.channels_last)}
    assert {"align_fa_forward_kernel", "binned_transpose_kernel", "pixel_bin_kernel"} <= defined  # discovery works
    assert defined <= planned, f"kernels the compile matrix never builds: {defined - planned}"


def test_kernels_read_no_plain_globals():
    # Triton's compiler rejects a global that is not a tl.constexpr; the interpreter does not. Structural check of
    # every name a kernel module's @triton.jit functions read from the module.
    from alignseg.kernels import align_cm, align_fa, align_fa_gather, bilinear, fixed_point

    for module in (align_fa, align_cm, align_fa_gather, bilinear, fixed_point):
        for attr, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if fn is None or getattr(fn, "__module__", None) != module.__name__:
                continue
            for used in fn.__code__.co_names:
                value = vars(module).get(used)
                if value is None or callable(value) or inspect.ismodule(value):
                    continue
                assert isinstance(value, tl.constexpr), (
                    f"{module.__name__}.{attr} reads the global {used} = {value!r}: make it a tl.constexpr")


def test_tile_orientation_follows_the_installed_triton():
    # Which axis of a gathered tile the compiler lays across a warp's lanes changed between Triton versions
    # (alignseg/kernels/layout_probe.py); launch.FIRST_AXIS_WINS_TIES is a version rule, and this compiles the probe
    # ahead of time (no GPU) to check the rule against the installed compiler. In a subprocess: the compiler needs
    # the kernels imported without TRITON_INTERPRET=1.
    import subprocess
    import sys

    from alignseg.kernels import launch
    from alignseg.kernels.report import MIN_TRITON

    if launch.triton_version() < MIN_TRITON:
        pytest.skip("the ahead-of-time compile needs triton >= 3.3")
    code = "from alignseg.kernels.report import first_axis_wins_ties; print(first_axis_wins_ties())"
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="0"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == str(launch.FIRST_AXIS_WINS_TIES), (
        f"triton {launch.triton_version()} breaks ties toward the {'first' if 'True' in result.stdout else 'last'} "
        "axis: update FIRST_AXIS_WINS_TIES in alignseg/kernels/launch.py")


def test_contiguous_maps_put_pixels_on_the_axis_the_compiler_lays_fastest(monkeypatch):
    from alignseg.kernels import launch

    nchw = torch.empty(2, 8, 5, 7)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    for first_axis_wins in (True, False):
        monkeypatch.setattr(launch, "FIRST_AXIS_WINS_TIES", first_axis_wins)
        assert launch.pixels_last(nchw) is (not first_axis_wins)
        assert launch.pixels_last(nhwc) is False  # channels provably contiguous: lanes there in every version
        assert launch.pixels_last(nchw[:, :1]) is (not first_axis_wins)  # one channel: only pixels to follow


def test_hopper_configs_apply_to_sm90_plans_only(monkeypatch):
    from alignseg.kernels import launch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU tables, not the interpreter's
    name = next(iter(launch.GPU_CONFIGS_SM90))
    cl = torch.empty(1, 32, 4, 4, device="meta", memory_format=torch.channels_last)
    with launch.planning_for(90):
        assert launch.launch_config(name, cl) == launch.GPU_CONFIGS_SM90[name]
        # Not for fp64 (its own, smaller tiles) nor for maps without vector loads.
        assert launch.launch_config(name, cl.double()) != launch.GPU_CONFIGS_SM90[name]
        contiguous = torch.empty(1, 32, 4, 4, device="meta")
        assert launch.launch_config(name, contiguous) == launch.GPU_CONFIGS_CONTIGUOUS[name]
    with launch.planning_for(80):
        assert launch.launch_config(name, cl) == launch.GPU_CONFIGS[name]
    assert launch.target_arch(cl) is None  # a meta (or CPU) tensor outside planning_for: no GPU to ask


def test_backward_stages_contiguous_maps_with_vector_loads_only():
    from alignseg.kernels.launch import stage_channels_last

    assert stage_channels_last(torch.empty(2, 32, 5, 7))
    assert not stage_channels_last(torch.empty(2, 32, 5, 7, memory_format=torch.channels_last))  # already
    assert not stage_channels_last(torch.empty(2, 40, 5, 7))  # C % 16 != 0: a copy gets no vector loads either
    assert not stage_channels_last(torch.empty(2, 32, 1, 1))  # one pixel: both layouts at once
