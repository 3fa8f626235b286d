/** TLS material for the client-facing side, and a self-signed certificate for the demo. */
import { readFileSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import tls from 'node:tls';
import type { Config } from '../config/schema.js';

export function createClientTlsContext(cfg: Config['tls']): tls.SecureContext | null {
  if (cfg.mode === 'disable') return null;
  return tls.createSecureContext({
    cert: readFileSync(cfg.cert_file!),
    key: readFileSync(cfg.key_file!),
    ca: cfg.ca_file ? readFileSync(cfg.ca_file) : undefined,
    minVersion: 'TLSv1.2',
  });
}

export interface GeneratedCertificates {
  caCert: string;
  caKey: string;
  cert: string;
  key: string;
}

/**
 * Generates a CA and a server certificate for `hosts` (DNS names and IPs) with openssl, so that
 * `sslmode=verify-full` works against it. Used by the demo and the tests.
 */
export function generateCertificates(dir: string, hosts: string[] = ['localhost', '127.0.0.1', '::1'], name = 'server'): GeneratedCertificates {
  const p = (f: string) => path.join(dir, f);
  const run = (args: string[]) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const caKey = p(`${name}-ca.key`);
  const caCert = p(`${name}-ca.crt`);
  const key = p(`${name}.key`);
  const csr = p(`${name}.csr`);
  const cert = p(`${name}.crt`);
  const ext = p(`${name}.ext`);
  run(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '825', '-subj', `/CN=trustgate ${name} CA`, '-keyout', caKey, '-out', caCert]);
  run(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-subj', `/CN=${hosts[0]}`, '-keyout', key, '-out', csr]);
  const san = hosts.map((h) => (/^[\d.]+$|:/.test(h) ? `IP:${h}` : `DNS:${h}`)).join(',');
  writeFileSync(ext, `subjectAltName=${san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n`);
  run(['x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-CAcreateserial', '-days', '825', '-extfile', ext, '-out', cert]);
  return { caCert, caKey, cert, key };
}
