#!/usr/bin/env python
"""Reference side of the speed comparison: mmdetection 3.3's ``inference_detector`` timed one image at
a time, driven over stdin by ``benchmarks/against_reference.py`` so that its runs alternate in time with
hrnetdet's (load from other processes then falls on both alike).

    /work/parity_env/bin/python tools/parity/time_reference.py --artifacts /work/parity_artifacts \
        --model faster_rcnn_hrnetv2p_w18 --threads 1

It builds the model from mmdetection's packaged config and the harness's ``checkpoint.pth`` and reads
every harness image as the reference's own loader does (cv2, BGR), then prints ``ready``. Each line
``<image file name>`` on stdin runs the detector on that image (array in memory, so no file reading
is timed) and prints ``{"wall": s, "cpu": s}``; ``quit`` (or end of input) stops it.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from make_reference import CONFIG_ROOT, CONFIGS, build_model, parse_model_name  # noqa: E402  (mmcv stand-in first)

import cv2  # noqa: E402
import torch  # noqa: E402
from mmdet.apis import inference_detector  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--artifacts', default='/work/parity_artifacts')
    ap.add_argument('--model', required=True)
    ap.add_argument('--threads', type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    family, width = parse_model_name(args.model)
    model, _ = build_model(os.path.join(CONFIG_ROOT, CONFIGS[family][width]), seed=0,
                           checkpoint=os.path.join(args.artifacts, args.model, 'checkpoint.pth'))
    image_dir = os.path.join(args.artifacts, 'images')
    images = {f: cv2.imread(os.path.join(image_dir, f)) for f in sorted(os.listdir(image_dir)) if f.endswith('.png')}
    with torch.no_grad():
        for img in images.values():  # warm-up
            inference_detector(model, img)
    print('ready', flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name in ('', 'quit'):
            break
        with torch.no_grad():
            t, c = time.perf_counter(), time.process_time()
            inference_detector(model, images[name])
            t, c = time.perf_counter() - t, time.process_time() - c
        print(json.dumps({'wall': t, 'cpu': c}), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
