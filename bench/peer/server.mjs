// The peer for `make bench`: panva's oidc-provider, configured as close to agentidp's agent flow
// as it goes. One confidential client (client_credentials grant, client_secret_basic), RFC 9068
// JWT access tokens through resource indicators, RFC 7662 introspection, the default in-memory
// adapter. Listens on 127.0.0.1 only.
//
// Environment:
//   PEER_PORT           port (default 3999)
//   PEER_ALG            ES256 (default) or RS256: the JWT access token signing algorithm
//   PEER_CLIENT_ID      default bench-client
//   PEER_CLIENT_SECRET  default bench-secret-0123456789abcdef0123456789abcdef
//
// Resources (RFC 8707):
//   urn:bench:jwt     (the default resource) JWT access tokens signed with PEER_ALG
//   urn:bench:opaque  opaque access tokens, kept in the in-memory adapter. oidc-provider does not
//                     keep JWT access tokens, so its introspection endpoint answers
//                     {"active":false} for them; the introspection scenario therefore asks for an
//                     opaque token (resource=urn:bench:opaque) and introspects that.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import process from 'node:process';

import Provider from 'oidc-provider';

const port = Number(process.env.PEER_PORT || 3999);
const alg = process.env.PEER_ALG || 'ES256';
const clientId = process.env.PEER_CLIENT_ID || 'bench-client';
const clientSecret = process.env.PEER_CLIENT_SECRET || 'bench-secret-0123456789abcdef0123456789abcdef';
const issuer = `http://127.0.0.1:${port}`;
const SCOPE = 'tools:read';
const JWT_RESOURCE = 'urn:bench:jwt';
const OPAQUE_RESOURCE = 'urn:bench:opaque';

if (!['ES256', 'RS256'].includes(alg)) {
  console.error(`peer: PEER_ALG must be ES256 or RS256, not ${alg}`);
  process.exit(2);
}

// The signing key, made fresh at start-up with node's crypto.
function signingJwk() {
  const { privateKey } = alg === 'ES256'
    ? generateKeyPairSync('ec', { namedCurve: 'P-256' })
    : generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg, use: 'sig' };
}

const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    introspection_endpoint_auth_method: 'client_secret_basic',
    scope: SCOPE,
  }],
  jwks: { keys: [signingJwk()] },
  scopes: [SCOPE],
  clientDefaults: { id_token_signed_response_alg: alg },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: {
      enabled: true,
      // The default policy; given explicitly so that the provider does not warn about it.
      allowedPolicy: async () => true,
    },
    revocation: { enabled: false },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => JWT_RESOURCE,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, resourceIndicator) => {
        if (resourceIndicator === JWT_RESOURCE) {
          return {
            scope: SCOPE,
            audience: JWT_RESOURCE,
            accessTokenTTL: 900,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg } },
          };
        }
        if (resourceIndicator === OPAQUE_RESOURCE) {
          return { scope: SCOPE, audience: OPAQUE_RESOURCE, accessTokenTTL: 900, accessTokenFormat: 'opaque' };
        }
        throw new Provider.errors.InvalidTarget();
      },
    },
  },
  ttl: { ClientCredentials: 900 },
});

provider.on('server_error', (ctx, err) => console.error('peer: server_error', err));

// /health, answered before the provider, like agentidp's.
const callback = provider.callback();
const server = (await import('node:http')).createServer((req, res) => {
  if (req.url === '/health') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok');
    return;
  }
  callback(req, res);
});
server.keepAliveTimeout = 65_000;
server.listen(port, '127.0.0.1', () => {
  console.log(`peer: oidc-provider listening on ${issuer} (alg ${alg}, node ${process.version})`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections?.();
    setTimeout(() => process.exit(0), 2000).unref();
  });
}
