"""The signed pages' shared script (issuer/data/console.js): the sign-in form is written
there once, and each page (GET /ops, GET /audit) only names the role its key needs."""

from __future__ import annotations

from importlib.resources import files

import pytest

from issuer.app import page

pytestmark = pytest.mark.fast

ROLES = {"ops": "ops", "audit": "auditor"}


@pytest.mark.parametrize("name", sorted(ROLES))
def test_the_sign_in_form_is_built_by_the_shared_script(name: str) -> None:
    data = files("issuer.data")
    assert 'id: "key-secret"' in data.joinpath("console.js").read_text()
    own = data.joinpath(f"{name}.html").read_text()
    assert "key-secret" not in own and '<form id="login-form"' not in own
    served = page(name)
    assert served.count("function loginForm(role, login)") == 1  # console.js, inlined
    assert f'loginForm("{ROLES[name]}", login);' in served
