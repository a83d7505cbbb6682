"""Pipeline stages: export, calibrate, engine, verify, finetune. One module per stage, one typed config each."""
