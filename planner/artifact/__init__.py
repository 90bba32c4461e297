"""What the planner writes and reads on disk, and the one atomic writer.

- :mod:`.atomic`: temp name + fsync + rename, refusing to replace anything but a regular file;
- :mod:`.plan`: the plan JSON schema (versioned, validated on load); :mod:`.records` its search
  record; :mod:`.plan_versions` the readers of every older schema version; :mod:`.checks` the
  field checkers; :mod:`.summary` the per-block view used by reports;
- :mod:`.layout`: the materialized folder (backbone layer files, ``quantization.json``, the PEFT
  adapter folder), file names, readers and writers;
- :mod:`.materialize`: plan -> that folder (LoftQ per layer, streamed, resumable);
- :mod:`.gguf_export`: that folder -> llama.cpp's model GGUF + LoRA adapter GGUF (``--format gguf``).

May import ``loftq``, ``search_spaces``, :mod:`planner.sources` and the top-level modules
(errors, settings, memory, devices, progress); never ``runtime``, ``train``, ``scoring``,
``search`` or ``cli``.
"""
