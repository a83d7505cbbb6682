"""The output dir's format: the ground floor every other part of sfr-export stands on.

Nothing here imports torch, onnxruntime or tensorrt.
"""

from .enums import Backend, Precision, StageKind, Status, Variant
from .inventory import Artifact, Candidate, load_spec
from .io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text, sha256_file
from .lock import writer_lock
from .manifest import MANIFEST_VERSION, ArtifactRecord, Manifest, StageRecord

__all__ = ["Artifact", "ArtifactRecord", "Backend", "Candidate", "MANIFEST_VERSION", "Manifest", "Precision",
           "StageKind", "StageRecord", "Status", "Variant", "atomic_dir", "atomic_path", "atomic_write_bytes",
           "atomic_write_text", "load_spec", "sha256_file", "writer_lock"]
