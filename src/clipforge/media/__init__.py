"""What phones and cameras write, beyond Pillow's formats: HEIC/HEIF and AVIF stills, camera RAW, video
keyframes; the EXIF a photo carries (date, camera, place, orientation); duplicates in tiers.

Every reader here goes through the same guards as `clipforge.transforms.load_image` (pixel count, aspect
ratio, checked before a full decode) and fails with `clipforge.transforms.ImageError`. The heavy libraries
(pillow-heif, rawpy, PyAV) are the `[media]` extra and are imported where they are used.
"""
