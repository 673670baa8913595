"""What Azure AI Content Safety (API 2023-10-01) accepts: the emulator refuses what the service refuses.

These are the service's published limits, written here rather than imported from ``sd_endpoint``: the
emulator stands in for Azure, so a wrong limit in the screener must show up as a refusal in the tests, not
be shared by both sides. ``tests/safety/test_emulator.py`` checks that the two agree.
"""

API_VERSION = "2023-10-01"
CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
OUTPUT_TYPES = ("FourSeverityLevels", "EightSeverityLevels")
MAX_TEXT_CHARS = 10_000  # Unicode code points per call
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_SIDE = 2048
MIN_IMAGE_SIDE = 50
