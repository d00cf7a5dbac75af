"""Integer deployment of quantized adder networks: the uint8 SAD kernel, fixed-point
requantization, the deployment package (export / load) and the integer inference engine."""

from adderquant.engine.engine import IntegerEngine, load
from adderquant.engine.export import export_model, fakequant_model, lower
from adderquant.engine.package import Package, PackageError, load_package, save_package
from adderquant.ops.sad import active_path, available_paths, sad_conv2d

__all__ = [
    "IntegerEngine",
    "Package",
    "PackageError",
    "active_path",
    "available_paths",
    "export_model",
    "fakequant_model",
    "load",
    "load_package",
    "lower",
    "sad_conv2d",
    "save_package",
]
