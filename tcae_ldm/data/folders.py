"""Walking image folders: which files are the images of which class, and what is left out and why.

- Names starting with a dot are ignored, folders and files alike: `.ipynb_checkpoints`, `.DS_Store`, macOS's `._x.jpg`
  companions, `.git` are not data, and a hidden class folder would shift every label after it.
- Symlinked folders are followed, each real folder once (a folder reached again through another link is left out
  and reported); a link that leads back to a folder it is inside (a loop) is refused, naming it.
- Images with transparency are found from the headers of the files whose format can hold it (PNG, GIF, WebP, TIFF,
  ...; JPEG cannot, so ImageNet costs nothing) and composited onto white when decoded (tcae_ldm.data.images).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

NO_ALPHA_EXTENSIONS = (".jpg", ".jpeg")


@dataclass
class Ignored:
    """What a walk left out: hidden names and folders reached a second time through a link."""
    hidden: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """'' or '; ignored: ...' for the log's class/image line."""
        parts = []
        if self.hidden:
            parts.append(f"{len(self.hidden)} hidden names (starting with '.', e.g. {os.path.basename(self.hidden[0])})")
        if self.repeated:
            parts.append(f"{len(self.repeated)} folders reached again through a symlink (e.g. {self.repeated[0]})")
        return f"; ignored: {', '.join(parts)}" if parts else ""


def walk_images(folder: str, ignored: Ignored, seen: dict[str, str] | None = None) -> list[str]:
    """The image files under `folder` in the order of sorted(os.walk(...)) (folders by path, files by name),
    following symlinked folders once each; `seen` (real folder -> the path it was read through) spans walks."""
    seen = {} if seen is None else seen
    files: dict[str, list[str]] = {}

    def visit(path: str, inside: tuple[str, ...]) -> None:
        real = os.path.realpath(path)
        parent = os.path.realpath(os.path.dirname(path))
        if real in inside or (os.path.islink(path) and (parent + os.sep).startswith(real.rstrip(os.sep) + os.sep)):
            raise ValueError(f"image folder {path} is a symlink loop: it leads back to {real}, a folder it is inside "
                             f"(its images would be read again and again); remove or re-point the link")
        if real in seen:
            ignored.repeated.append(path)
            return
        seen[real] = path
        files[path] = []
        with os.scandir(path) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                if e.name.startswith("."):
                    ignored.hidden.append(e.path)
                elif e.is_dir():  # follows a symlink
                    visit(e.path, (*inside, real))
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    files[path].append(e.path)

    visit(folder, ())
    return [p for d in sorted(files) for p in files[d]]


def find_images(root: str) -> list[str]:
    """Every image file under root, recursively, in a stable order (hidden names and repeated folders left out)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    ignored = Ignored()
    paths = sorted(walk_images(root, ignored))
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {root!r}{ignored.summary()}")
    return paths


def scan_image_folder(root: str, classes: list[str] | None = None
                      ) -> tuple[list[tuple[str, int]], list[str], list[str], Ignored]:
    """(path, class index) for every image under root/<class>/..., the class names, the class folders that hold no
    image, and what was left out.

    Without `classes`, the index is the sorted class folders that hold images (an empty folder is not a class).
    With `classes` (the training split's, or a class-list file), every folder must be one of them, and labels
    are positions in that list; a split may lack some of the classes.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    ignored, seen = Ignored(), {}
    with os.scandir(root) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    ignored.hidden += [e.path for e in listed if e.name.startswith(".")]
    folders = [e.name for e in listed if not e.name.startswith(".") and e.is_dir()]
    if not folders:
        raise FileNotFoundError(f"image folder {root!r} has no class sub-folders (expected {root}/<class>/<image>)"
                                f"{ignored.summary()}")
    same = {}
    for name in folders:
        real = os.path.realpath(os.path.join(root, name))
        if real in same:
            raise ValueError(f"class folders {same[real]!r} and {name!r} of {root!r} are the same folder {real} "
                             f"(through a symlink): its images would be given two labels")
        same[real] = name
    files = {name: walk_images(os.path.join(root, name), ignored, seen) for name in folders}
    empty = [name for name in folders if not files[name]]
    if classes is None:
        classes = [name for name in folders if files[name]]
    else:
        unknown = [name for name in folders if name not in classes and files[name]]
        if unknown:
            raise ValueError(f"image folder {root!r} has classes that training does not know: {unknown[:10]}"
                             f"{' ...' if len(unknown) > 10 else ''} (the class index has {len(classes)} classes)")
    index = {name: i for i, name in enumerate(classes)}
    samples = [(path, index[name]) for name in folders if files[name] for path in files[name]]
    if not samples:
        raise FileNotFoundError(f"image folder {root!r} has class folders {folders[:5]} but no image files "
                                f"({', '.join(IMG_EXTENSIONS)}){ignored.summary()}")
    return samples, list(classes), empty, ignored


def read_class_list(path: str) -> list[str]:
    """Class names, one per line (blank lines and #-comments ignored): the class index, in order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class list {path!r} does not exist")
    with open(path) as f:
        names = [line.split("#", 1)[0].strip() for line in f]
    names = [n for n in names if n]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if not names or dupes:
        raise ValueError(f"class list {path} " + (f"repeats {dupes[:5]}" if dupes else "has no class names"))
    return names


def has_transparency(img: Image.Image) -> bool:
    """Whether an opened image has an alpha channel or a transparent colour (read from its header)."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def transparent_images(paths: list[str]) -> list[str]:
    """The files among `paths` whose images have transparency (headers only; JPEGs are not opened)."""
    found = []
    for path in paths:
        if path.lower().endswith(NO_ALPHA_EXTENSIONS):
            continue
        try:
            with Image.open(path) as f:
                if has_transparency(f):
                    found.append(path)
        except Exception:  # noqa: BLE001  (an unreadable file is named when it is decoded, by the dataset's policy)
            continue
    return found
