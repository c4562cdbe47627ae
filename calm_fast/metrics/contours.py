"""The boxes of one thresholded score map as the reference evaluator builds them: OpenCV's contours of
`map > threshold` (every contour, or the largest), each turned into its bounding box. The overlay grid
draws the predicted box with it, and the OpenCV oracle (`opencv_reference`) scores with it; the fast
metrics (`boxes`) never call it.
"""

from __future__ import annotations

import cv2
import numpy as np


def contour_boxes(quantized: np.ndarray, integer_threshold: int, multi_contour: bool) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) of the contours of `quantized > integer_threshold`, as the reference builds them."""
    height, width = quantized.shape
    _, foreground = cv2.threshold(quantized, int(integer_threshold), 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(foreground, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) == 0:
        return np.zeros((1, 4), np.int64)
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]  # max() keeps the first of equal areas
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return np.asarray(boxes, np.int64)
