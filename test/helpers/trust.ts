/**
 * A database set up for trusted-session tests: a security administrator, the trusted user
 * `app_tier`, permanent proxy users, roles, and a table with a row-level-security policy by proxy
 * user. Passwords are registered so the stack's url()/clientConfig() work for these roles.
 */
import type { EmbeddedPostgres } from './postgres.js';
import { USERS } from './stack.js';

export const TRUST_USERS = {
  secadm: 'secadm-pw',
  secadm2: 'secadm2-pw',
  app_tier: 'app-tier-pw',
  other_tier: 'other-tier-pw',
  carol: 'carol-pw',
  dave: 'dave-pw',
} as const;
Object.assign(USERS as Record<string, string>, TRUST_USERS);

export const TRUST_SETUP_SQL = `
-- The login roles exist already (preparePostgres creates every user in USERS).
ALTER ROLE secadm CREATEROLE;
ALTER ROLE secadm2 CREATEROLE;
GRANT trustgate_admin TO secadm, secadm2;
CREATE ROLE web_reader NOLOGIN;
CREATE ROLE web_writer NOLOGIN;
CREATE ROLE auditor NOLOGIN;
GRANT auditor TO alice;
GRANT web_reader, web_writer, auditor, alice, bob, carol, dave TO secadm, secadm2 WITH ADMIN OPTION;
CREATE SCHEMA shop;
CREATE TABLE shop.orders (id int PRIMARY KEY, owner text NOT NULL, item text NOT NULL);
INSERT INTO shop.orders VALUES (1, 'alice', 'book'), (2, 'bob', 'pen'), (3, 'bob_from_web', 'lamp'), (4, 'carol', 'cup'), (5, 'alice', 'mug');
ALTER TABLE shop.orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY by_proxy_user ON shop.orders USING (owner = (SELECT trustgate.proxy_user()));
CREATE POLICY writer_inserts ON shop.orders FOR INSERT WITH CHECK (owner = (SELECT trustgate.proxy_user()));
CREATE TABLE shop.audit_notes (note text);
INSERT INTO shop.audit_notes VALUES ('only auditors read this');
GRANT USAGE ON SCHEMA shop TO PUBLIC;
GRANT SELECT ON shop.orders TO web_reader, alice, carol;
GRANT INSERT ON shop.orders TO web_writer;
GRANT SELECT ON shop.audit_notes TO auditor;
GRANT SELECT ON shop.orders TO app_tier;
`;

export async function setupTrustWorld(pg: EmbeddedPostgres): Promise<void> {
  await pg.query(TRUST_SETUP_SQL);
}

/** The story's rules, run by a trustgate administrator through the gateway. */
export const STORY_GRANTS = [
  'GRANT CONNECT THROUGH app_tier TO PERMANENT alice WITHOUT ROLE;',
  'GRANT CONNECT THROUGH app_tier TO bob_from_web WITH ROLE web_reader, web_writer;',
  'GRANT CONNECT THROUGH app_tier TO PERMANENT carol WITH ROLE web_reader;',
];
