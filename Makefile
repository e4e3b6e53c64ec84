# retina_d2: `make demo` runs the main job on the embedded synthetic dataset, `make test` the tests.
# Both build (or reuse) the environment first: see tools/setup_env.sh.
PY := .venv/bin/python
DEMO_OUT ?= output/demo

.PHONY: env demo test lock clean

env:
	@bash tools/setup_env.sh

# Generate + convert the synthetic dataset, train the light Mask R-CNN on it (a few CPU minutes),
# evaluate: mAP35/50/75 table, metrics JSON and overlay pictures under $(DEMO_OUT)/maskrcnn_synthetic.
demo: env
	RETINA_D2_DATASETS=$(DEMO_OUT)/datasets $(PY) tools/convert_dataset.py synthetic \
		--out $(DEMO_OUT)/datasets/synthetic --count 24 --size 512 --overwrite
	RETINA_D2_DATASETS=$(DEMO_OUT)/datasets $(PY) tools/train_net.py \
		--config-file configs/maskrcnn_synthetic.yaml OUTPUT_DIR $(DEMO_OUT)/maskrcnn_synthetic

test: env
	$(PY) -m pytest tests

# Re-pin requirements.lock from requirements.in (run after changing requirements.in).
lock:
	rm -rf /tmp/retina_d2_lock && python3 -m venv /tmp/retina_d2_lock
	/tmp/retina_d2_lock/bin/python -m pip install -q -r requirements.in
	(echo "# Generated from requirements.in by 'make lock' (pip freeze of a working environment). Python 3.11, x86_64."; \
	 /tmp/retina_d2_lock/bin/python -m pip freeze | grep -v '^pip=\|^setuptools=') > requirements.lock

clean:
	rm -rf .venv output
