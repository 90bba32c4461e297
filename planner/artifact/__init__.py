"""What the planner writes and reads on disk: the plan and the materialized folder's format.

- :mod:`.plan`: the plan JSON schema (versioned, validated on load); :mod:`.records` its search
  and initialisation records; :mod:`.plan_versions` the readers of every older schema version;
  :mod:`.checks` the field checkers; :mod:`.summary` the per-block view used by reports;
- :mod:`.layout`: the materialized folder (backbone layer files, ``quantization.json``, the PEFT
  adapter folder): its file names, and the readers and writers of its pieces.

The builds that produce these files live in :mod:`planner.build`.
May import ``loftq``, ``search_spaces``, :mod:`planner.files` and the core modules (errors,
options, settings, overheads, memory); nothing above them.
"""
