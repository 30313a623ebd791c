"""The run directory on disk, one concern a module: `run` (RunStore), `manifest` (config and
manifest), `records` (resumable record tables), `scorefile` (EdgeScores as safetensors),
`lock` (one writer or shard workers), `paths` (confinement), `atomic` (atomic writes, used by
everything that writes files), `canonical` (canonical JSON and the config diff)."""
