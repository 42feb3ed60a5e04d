import json
import pathlib

import pytest

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def r1_config() -> dict:
  return json.loads((DATA / "deepseek_r1_config.json").read_text())


@pytest.fixture(scope="session")
def v2_lite_config() -> dict:
  return json.loads((DATA / "deepseek_v2_lite_config.json").read_text())
