"""dwm.shared: the contract between preprocessing and training (features, config, models)."""

# cv2 must be imported before decord: decord's bundled libpng otherwise breaks cv2's PNG codec
# (cv2.imread/imdecode of a PNG return None with "libpng error"). Every dwm package imports
# dwm.shared first, so this one import fixes the order for the whole project.
import cv2  # noqa: F401
