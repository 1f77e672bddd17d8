"""Kubernetes API emulator for Custos tests.

No kube-apiserver can be installed on the test machines, so the Kubernetes
backend and Kubernetes auth are tested against `kmock` (a stateful Kubernetes
API emulator), with a few additions made here:

* ``POST /apis/authentication.k8s.io/v1/tokenreviews`` is answered from a
  JSON file of known service-account tokens, before kmock's object tracking
  (which would store each review and answer 409 to the second one).
  Requests without ``Authorization: Bearer ...`` get 401; with
  ``--reviewer-token`` set, any other bearer token gets 403.
  ``GET /_emulator/tokenreviews`` lists the reviews received so far.
* Error bodies use the reasons kube-rs recognises (``NotFound``,
  ``AlreadyExists``) instead of kmock's own.
* Everything else (Secrets etc.) is kmock's in-memory emulation.

Usage::

    python3 tests/support/kubernetes_emulator.py --port PORT --tokens FILE \
        [--reviewer-token TEXT]

FILE maps token text to the user it authenticates::

    {"<jwt>": {"username": "system:serviceaccount:NS:NAME",
               "uid": "...", "audiences": ["custos"]}}

Listens on 127.0.0.1:PORT (plain HTTP), prints ``ready`` once listening,
and runs until SIGTERM or SIGINT.
"""

import argparse
import asyncio
import json
import signal
import sys

import aiohttp.web
import kmock
from kmock._internal import k8s as kmock_k8s

TOKENREVIEWS_PATH = '/apis/authentication.k8s.io/v1/tokenreviews'
RECORD_PATH = '/_emulator/tokenreviews'

# kube-rs matches on these reasons (e.g. `Api::get_opt` on "NotFound").
REASONS = {404: 'NotFound', 409: 'AlreadyExists'}


def status(code, reason, message):
    """A Kubernetes `Status` failure response."""
    return aiohttp.web.json_response({
        'apiVersion': 'v1', 'kind': 'Status', 'metadata': {},
        'status': 'Failure', 'code': code, 'reason': reason, 'message': message,
    }, status=code)


def user_info(entry):
    username = entry['username']
    groups = entry.get('groups')
    if groups is None:
        parts = username.split(':')
        if len(parts) == 4 and parts[:2] == ['system', 'serviceaccount']:
            groups = ['system:serviceaccounts', f'system:serviceaccounts:{parts[2]}']
        else:
            groups = []
    return {'username': username, 'uid': entry.get('uid', ''), 'groups': groups}


class Emulator(kmock.KubernetesEmulator):
    def __init__(self, tokens, reviewer_token=None):
        super().__init__()
        self.tokens = tokens
        self.reviewer_token = reviewer_token
        self.reviews = []  # {"authorization", "token", "audiences"} per TokenReview

    async def _handle(self, request):
        path = request.url.path.rstrip('/')
        if path == TOKENREVIEWS_PATH:
            return self.token_review(request)
        if path == RECORD_PATH and request.method == kmock.method.GET:
            return aiohttp.web.json_response(self.reviews)
        try:
            response = await super()._handle(request)
        except kmock_k8s.KubernetesError as exc:
            if exc.status not in REASONS:
                raise
            data = request.data if isinstance(request.data, dict) else {}
            name = request.name or data.get('metadata', {}).get('name')
            if exc.status == 404 and (name is None or request.resource is None):
                message = 'the server could not find the requested resource'
            else:
                verb = 'not found' if exc.status == 404 else 'already exists'
                message = f'{request.resource.plural} "{name}" {verb}'
            return status(exc.status, REASONS[exc.status], message)
        if request.action == kmock.action.CREATE and response.status == 200:
            response.set_status(201)  # as the real API server does
        return response

    def token_review(self, request):
        if request.method != kmock.method.POST:
            return status(405, 'MethodNotAllowed', 'the server does not allow this method')

        headers = {k.lower(): v for k, v in request.headers.items()}
        authorization = headers.get('authorization')
        body = request.data if isinstance(request.data, dict) else {}
        spec = body.get('spec') if isinstance(body.get('spec'), dict) else {}
        self.reviews.append({
            'authorization': authorization,
            'token': spec.get('token'),
            'audiences': spec.get('audiences'),
        })

        scheme, _, bearer = (authorization or '').partition(' ')
        if scheme.lower() != 'bearer' or not bearer.strip():
            return status(401, 'Unauthorized', 'Unauthorized')
        if self.reviewer_token is not None and bearer.strip() != self.reviewer_token:
            return status(403, 'Forbidden',
                          'tokenreviews.authentication.k8s.io is forbidden: '
                          'the bearer token is not the reviewer token')
        # The API server takes the kind from the URL when the body leaves it out, as
        # Vault's and OpenBao's Kubernetes auth do; a body naming another kind is refused.
        if body.get('kind', 'TokenReview') != 'TokenReview' \
                or not isinstance(spec.get('token'), str):
            return status(400, 'BadRequest', 'expected a TokenReview with spec.token')

        entry = self.tokens.get(spec['token'])
        requested = spec.get('audiences') or []
        if entry is not None:
            audiences = list(entry.get('audiences', []))
            if requested:
                audiences = [a for a in requested if a in audiences]
        if entry is None or (requested and not audiences):
            review_status = {'authenticated': False, 'error': 'invalid token'}
        else:
            review_status = {'authenticated': True, 'user': user_info(entry),
                             'audiences': audiences}

        return aiohttp.web.json_response({
            'apiVersion': 'authentication.k8s.io/v1', 'kind': 'TokenReview',
            'metadata': {'creationTimestamp': None},
            'spec': spec, 'status': review_status,
        }, status=201)


async def serve(args):
    with open(args.tokens, encoding='utf-8') as f:
        tokens = json.load(f)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    emulator = Emulator(tokens, args.reviewer_token)
    emulator.resources.load_bundled()
    async with emulator, kmock.Server(emulator, host='127.0.0.1', port=args.port):
        print('ready', flush=True)
        await stop.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--port', type=int, required=True)
    parser.add_argument('--tokens', required=True, help='JSON file: token -> user')
    parser.add_argument('--reviewer-token', default=None,
                        help='answer 403 unless TokenReviews bear this token')
    asyncio.run(serve(parser.parse_args()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
