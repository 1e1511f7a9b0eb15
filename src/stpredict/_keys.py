"""Element, table and attribute names used across the package, defined once."""

from __future__ import annotations

__all__ = ["Attrs", "Keys"]


class Keys:
    """Default element names."""

    image = "he"
    spots = "spots"
    table = "table"
    truth = "truth"
    tissue = "tissue"
    region_key = "region"
    instance_key = "instance_id"

    @staticmethod
    def dense(image_key: str, model_name: str = "pixnet") -> str:
        """Default key of a dense map predicted from ``image_key``."""
        return f"{image_key}_{model_name}"

    @staticmethod
    def binned(element_key: str, bin_size_um: float) -> str:
        """Default key of a table or shapes element of square bins of ``bin_size_um``."""
        size = f"{bin_size_um:g}".replace(".", "p")
        return f"{element_key}_{size}um"

    @staticmethod
    def tissue_mask(image_key: str) -> str:
        """Default key of the tissue labels computed from ``image_key``."""
        return f"{image_key}_tissue"


class Attrs:
    """Keys inside ``attrs``/``uns`` that stpredict writes."""

    root = "stpredict"  # attrs["stpredict"] on elements, uns["stpredict"] on tables
    value_kind = "value_kind"  # "density" or "intensive"
    density = "density"
    intensive = "intensive"
