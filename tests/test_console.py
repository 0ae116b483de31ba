"""The signed pages' shared script and styles (issuer/data/console.js, console.css): the
sign-in form, its styles and the page's start are written there once, and each page (GET
/ops, GET /audit) only names the role its key needs."""

from __future__ import annotations

from importlib.resources import files

import pytest

from issuer.app import SHARED, page

pytestmark = pytest.mark.fast

ROLES = {"ops": "ops", "audit": "auditor"}


@pytest.mark.parametrize("name", sorted(ROLES))
def test_the_sign_in_form_is_built_by_the_shared_script(name: str) -> None:
    data = files("issuer.data")
    assert 'id: "key-secret"' in data.joinpath("console.js").read_text()
    own = data.joinpath(f"{name}.html").read_text()
    assert "key-secret" not in own and '<form id="login-form"' not in own
    assert "#login" not in own and "savedKey(" not in own  # its styles and start: shared
    served = page(name)
    assert served.count("function loginForm(role, login)") == 1  # console.js, inlined
    assert served.count("#login h2 {") == 1  # console.css, inlined
    assert not any(place in served for place in SHARED)  # no place left empty
    assert f'startSignIn("{ROLES[name]}", STORE, login, showLogin' in served
