"""ESM Studio — the Hugging Face Space's ``app_file`` and ``python app.py``: the app lives in :mod:`esm_core.app`."""
from esm_core.app import build_app, launch_kwargs, main, make_demo  # noqa: F401  (tests/fake_pool.py uses these)

if __name__ == "__main__":
    main()
