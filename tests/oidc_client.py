"""An OpenID Connect relying party built on authlib, a library we did not write.

It signs a person in against the server at ISSUER with the authorization code flow and PKCE
(S256), following the server's own HTML sign-in and consent forms the way a browser would,
validates the ID token against the server's JWKS (signature, iss, aud, nonce, at_hash), refreshes,
and calls userinfo. It prints one JSON object with what it saw; any failure raises.

Usage: oidc_client.py ISSUER CLIENT_ID CLIENT_SECRET REDIRECT_URI EMAIL PASSWORD
"""

import json
import sys
from html.parser import HTMLParser
from urllib.parse import parse_qs, urljoin, urlparse

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebKey, jwt
from authlib.oidc.core import CodeIDToken


class Forms(HTMLParser):
    """The forms of a page: their action and the named inputs and buttons in each."""

    def __init__(self):
        super().__init__()
        self.forms = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "fields": {}, "buttons": {}})
        elif self.forms and tag == "input" and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""
        elif self.forms and tag == "button" and a.get("name"):
            self.forms[-1]["buttons"][a.get("value", "")] = a["name"]


def only_form(html):
    p = Forms()
    p.feed(html)
    assert len(p.forms) == 1, f"one form expected, found {len(p.forms)}"
    return p.forms[0]


def main():
    issuer, client_id, client_secret, redirect_uri, email, password = sys.argv[1:7]
    meta = requests.get(f"{issuer}/.well-known/openid-configuration", timeout=10).json()
    assert meta["issuer"] == issuer, meta["issuer"]
    assert "S256" in meta["code_challenge_methods_supported"]

    client = OAuth2Session(
        client_id,
        client_secret,
        scope="openid profile email offline_access",
        redirect_uri=redirect_uri,
        code_challenge_method="S256",
        token_endpoint_auth_method="client_secret_basic",
    )
    verifier = generate_token(64)
    nonce = generate_token(20)
    url, state = client.create_authorization_url(
        meta["authorization_endpoint"], code_verifier=verifier, nonce=nonce
    )

    # The browser: the sign-in form, then the consent form, then the redirect back.
    browser = requests.Session()
    page = browser.get(url, timeout=10)
    assert page.status_code == 200, page.status_code
    assert "default-src 'none'" in page.headers["content-security-policy"]
    form = only_form(page.text)
    fields = dict(form["fields"], email=email, password=password)
    page = browser.post(urljoin(page.url, form["action"]), data=fields, allow_redirects=False, timeout=10)
    assert page.status_code == 200, f"consent page expected, got {page.status_code}"
    form = only_form(page.text)
    fields = dict(form["fields"])
    fields[form["buttons"]["allow"]] = "allow"
    back = browser.post(urljoin(page.url, form["action"]), data=fields, allow_redirects=False, timeout=10)
    assert back.status_code == 303, back.status_code
    location = back.headers["location"]
    assert location.startswith(redirect_uri), location

    # RFC 9207: the response names its issuer, so a mixed-up client would notice.
    params = parse_qs(urlparse(location).query)
    assert params["iss"] == [issuer], params
    assert params["state"] == [state], params

    token = client.fetch_token(
        meta["token_endpoint"], authorization_response=location, code_verifier=verifier, state=state
    )
    jwks = JsonWebKey.import_key_set(requests.get(meta["jwks_uri"], timeout=10).json())
    claims = jwt.decode(
        token["id_token"],
        jwks,
        claims_cls=CodeIDToken,
        claims_options={"iss": {"essential": True, "values": [issuer]}},
        claims_params={"nonce": nonce, "client_id": client_id, "access_token": token["access_token"]},
    )
    claims.validate(leeway=5)
    assert claims["aud"] == client_id and claims["azp"] == client_id
    assert claims["nonce"] == nonce
    assert claims["amr"] == ["pwd"]
    assert "at_hash" in claims and "auth_time" in claims

    refreshed = client.refresh_token(meta["token_endpoint"], refresh_token=token["refresh_token"])
    assert refreshed["refresh_token"] != token["refresh_token"]
    assert refreshed["access_token"] != token["access_token"]

    info = client.get(meta["userinfo_endpoint"], timeout=10)
    assert info.status_code == 200, info.text
    info = info.json()
    assert info["sub"] == claims["sub"], (info, claims)

    print(
        json.dumps(
            {
                "sub": claims["sub"],
                "email": info.get("email"),
                "id_token_alg": jwt_header_alg(token["id_token"]),
                "first_refresh_token": token["refresh_token"],
                "access_token": refreshed["access_token"],
                "scope": refreshed.get("scope"),
            }
        )
    )


def jwt_header_alg(token):
    import base64

    head = token.split(".")[0]
    head += "=" * (-len(head) % 4)
    return json.loads(base64.urlsafe_b64decode(head))["alg"]


if __name__ == "__main__":
    main()
