"""dwm.training"""

import dwm.shared  # noqa: F401  (fixes the cv2-before-decord import order)
