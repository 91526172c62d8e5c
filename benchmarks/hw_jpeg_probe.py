"""The GPU's hardware JPEG engines (nvImageCodec) against nvJPEG's CUDA decoder, on ImageNet-like JPEGs in memory,
each through the eval's own call (``hardware_decode``, ``nvjpeg_decode``):
pixels against Pillow's, each decoder alone, and each beside the eager ResNet-50 (bf16, batches of 256) running in
the main thread, also with the encoder held to a CUDA green context of all SMs but ``--reserve``: whether the
decoders' own kernels lose their rate waiting behind the encoder's for SMs (run 11: they do not).
Needs nvImageCodec (``pip install -e '.[hw-jpeg-cu13]'``) and a GPU.

    python benchmarks/hw_jpeg_probe.py [--images 2048] [--seconds 3] [--reserve 8,16]

One JSON line per measurement: ``vs_pil`` (mean and max absolute pixel difference to Pillow over 64 images),
``alone`` and ``beside_encoder`` (images/s; the encoder's images/s beside; ``reserved_sms`` where it ran in a green
context), each with the bitstreams in pageable memory (as the eval reads them) and in one pinned buffer
(``bitstreams``; run 12: mixed here, and slower in the eval, so the eval kept pageable reads).
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from collections.abc import Callable
from multiprocessing import Pool

import numpy as np
import torch
import torchvision
from common import emit
from imagenet_like import photo
from PIL import Image

from ssl_patchbench.data.batches import hardware_decode, nvjpeg_decode

_GREEN_CONTEXTS: list = []
Decode = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor | None]]  # the eval's: -> [3, H, W]


def rate(step: Callable[[], int], seconds: float) -> float:
    """Items per second of ``step`` (returns its items) called until ``seconds`` have passed."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += step()
    torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def _until_stopped(step: Callable[[], int], stop: threading.Event, rates: list[float]) -> None:
    """``step`` called until ``stop`` is set; its items per second appended to ``rates``."""
    done, start = 0, time.perf_counter()
    while not stop.is_set():
        done += step()
    rates.append(done / (time.perf_counter() - start))


def in_green_context(num_sms: int, step: Callable[[], int]) -> Callable[[], int]:
    """``step`` with its CUDA work on a stream of a green context of ``num_sms`` SMs (PyTorch 2.11 to 2.14 make
    one the same way)."""
    from torch.cuda.green_contexts import GreenContext

    ctx = GreenContext.create(num_sms=num_sms, device_id=0)
    _GREEN_CONTEXTS.append(ctx)  # a green context's streams die with it
    stream = ctx.Stream()

    def run() -> int:
        with torch.cuda.stream(stream):
            return step()

    return run


def pinned_views(datas: list[torch.Tensor]) -> list[torch.Tensor]:
    """The bitstreams copied into one page-locked buffer, a view each."""
    buffer = torch.cat(datas).pin_memory()
    ends = np.cumsum([len(d) for d in datas])
    return [buffer[end - len(d) : end] for d, end in zip(datas, ends, strict=True)]


def beside(step: Callable[[], int], encode: Callable[[], int], seconds: float) -> tuple[float, float]:
    """Images/s of ``step`` in a thread and of ``encode`` in this one, at the same time."""
    stop, decoded = threading.Event(), []
    thread = threading.Thread(target=_until_stopped, args=(step, stop, decoded))
    thread.start()
    encoded = rate(encode, seconds)
    stop.set()
    thread.join()
    return encoded, decoded[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--reserve", default="8,16", help="SMs left out of the encoder's green context")
    args = parser.parse_args()
    with Pool() as pool:
        jpegs = [data for data, _ in pool.map(photo, range(args.images))]
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    decoders: dict[str, Decode] = {"nvjpeg": nvjpeg_decode, "hw": hardware_decode}
    cuda = torch.device("cuda")
    pil = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).astype(int) for b in jpegs[:64]]
    for name, decode in decoders.items():
        images = [im.permute(1, 2, 0).cpu().numpy().astype(int) for im in decode(datas[:64], cuda)]
        diffs = [np.abs(im - p) for im, p in zip(images, pil, strict=True)]
        emit(measurement="vs_pil", decoder=name, mean_abs=float(np.mean([d.mean() for d in diffs])),
             max_abs=int(max(d.max() for d in diffs)))  # fmt: skip
    side = torch.cuda.Stream()

    memories = {"pageable": datas, "pinned": pinned_views(datas)}

    def pass_of(decode: Decode, batch: int, bitstreams: list[torch.Tensor]) -> Callable[[], int]:
        def step() -> int:
            with torch.cuda.stream(side):
                for lo in range(0, len(bitstreams), batch):
                    decode(bitstreams[lo : lo + batch], cuda)
            side.synchronize()
            return len(bitstreams)

        return step

    cases = [
        ((name, batch, memory), pass_of(decode, batch, bitstreams))
        for name, decode in decoders.items()
        for batch in (256, 2048)
        for memory, bitstreams in memories.items()
    ]
    for (name, batch, memory), step in cases:
        step()
        emit(measurement="alone", decoder=name, batch=batch, bitstreams=memory,
             images_per_s=round(rate(step, args.seconds)))  # fmt: skip
    encoder = torchvision.models.resnet50().cuda().eval().to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    x = torch.rand(256, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)

    def encode() -> int:
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            encoder(x)
        return len(x)

    encode()
    emit(measurement="encoder_alone", images_per_s=round(rate(encode, args.seconds)))
    for (name, batch, memory), step in cases:
        encoded, decoded = beside(step, encode, args.seconds)
        emit(measurement="beside_encoder", decoder=name, batch=batch, bitstreams=memory,
             encoder_images_per_s=round(encoded), decoded_images_per_s=round(decoded))  # fmt: skip
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for reserve in (int(r) for r in args.reserve.split(",") if r):
        try:
            green = in_green_context(sms - reserve, encode)
            green()
        except Exception as exc:  # no green contexts on this driver or build: the other results stand
            emit(measurement="green_context", reserved_sms=reserve, error=f"{type(exc).__name__}: {exc}"[-500:])
            break
        emit(measurement="encoder_alone", reserved_sms=reserve, images_per_s=round(rate(green, args.seconds)))
        for (name, batch, memory), step in cases:
            encoded, decoded = beside(step, green, args.seconds)
            emit(measurement="beside_encoder", decoder=name, batch=batch, bitstreams=memory, reserved_sms=reserve,
                 encoder_images_per_s=round(encoded), decoded_images_per_s=round(decoded))  # fmt: skip


if __name__ == "__main__":
    main()
