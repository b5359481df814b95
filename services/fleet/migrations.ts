/**
 * The gateway's own changes to the original ai-maestro schema.
 *
 * Rules: a migration may add tables, columns and indexes and may widen a column; it never drops or
 * renames anything the original schema has, so the original ai-maestro services keep working on a
 * migrated database. Every migration checks the current state before it changes anything, and the
 * applied ones are recorded in `maestro_migrations`, so `migrate` can run any number of times (and
 * from several replicas at once). Fixed SQL only.
 */
import { GatewayError } from '../http/errors.js'
import type { Query } from './inventory.js'

export interface Migration {
  /** Unique, never renamed once released; recorded in maestro_migrations.name. */
  name: string
  /** Brings the database to the migrated state; does nothing when it is already there. */
  up: (query: Query) => Promise<void>
}

const ORIGINAL_TABLES = ['computers', 'gpus', 'llms', 'diffusors', 'speech_models', 'assignments', 'assignment_gpus']

const CREATE_MIGRATIONS_TABLE = `CREATE TABLE IF NOT EXISTS maestro_migrations (
  name       VARCHAR(100) NOT NULL,
  applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  PRIMARY KEY (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`

const CREATE_API_KEYS_TABLE = `CREATE TABLE IF NOT EXISTS api_keys (
  id             INT NOT NULL AUTO_INCREMENT,
  name           VARCHAR(64) NOT NULL,
  secret_sha256  CHAR(64) NOT NULL,
  priority       ENUM('high', 'normal', 'low') NOT NULL DEFAULT 'normal',
  max_concurrent INT NULL,
  max_queued     INT NULL,
  rpm            INT NULL,
  models         TEXT NULL,
  created_at     TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  revoked_at     TIMESTAMP NULL DEFAULT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uq_api_keys_name (name),
  UNIQUE KEY uq_api_keys_secret_sha256 (secret_sha256)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`

const CREATE_USAGE_HOURLY_TABLE = `CREATE TABLE IF NOT EXISTS maestro_usage_hourly (
  hour                 DATETIME NOT NULL,
  client               VARBINARY(800) NOT NULL,
  model                VARBINARY(800) NOT NULL,
  assignment           VARBINARY(800) NOT NULL,
  requests             BIGINT NOT NULL DEFAULT 0,
  prompt_tokens        BIGINT NOT NULL DEFAULT 0,
  cached_prompt_tokens BIGINT NOT NULL DEFAULT 0,
  output_tokens        BIGINT NOT NULL DEFAULT 0,
  images               BIGINT NOT NULL DEFAULT 0,
  audio_seconds        DOUBLE NOT NULL DEFAULT 0,
  gpu_seconds          DOUBLE NOT NULL DEFAULT 0,
  errors               BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (hour, client, model, assignment)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`

const CREATE_USAGE_ROLLUPS_TABLE = `CREATE TABLE IF NOT EXISTS maestro_usage_rollups (
  id         VARCHAR(64) CHARACTER SET ascii NOT NULL,
  applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  PRIMARY KEY (id),
  KEY idx_usage_rollups_applied_at (applied_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`

const CREATE_MODEL_ALIASES_TABLE = `CREATE TABLE IF NOT EXISTS maestro_model_aliases (
  alias      VARCHAR(100) NOT NULL,
  model      VARCHAR(100) NOT NULL,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  PRIMARY KEY (alias)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`

/** A model's fallbacks in order: `position` 0 is tried first. */
const CREATE_MODEL_FALLBACKS_TABLE = `CREATE TABLE IF NOT EXISTS maestro_model_fallbacks (
  model    VARCHAR(100) NOT NULL,
  position INT NOT NULL,
  fallback VARCHAR(100) NOT NULL,
  PRIMARY KEY (model, position)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`

/** MySQL/MariaDB error numbers meaning "already there" (another replica got there first). */
const ER_DUP_KEYNAME = 1061

async function columnLength (query: Query, table: string, column: string): Promise<number | undefined> {
  const rows = await query(
    'SELECT CHARACTER_MAXIMUM_LENGTH AS len FROM information_schema.COLUMNS ' +
    'WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?',
    [table, column]
  )
  return rows.length === 0 ? undefined : Number(rows[0].len)
}

export async function hasColumn (query: Query, table: string, column: string): Promise<boolean> {
  return await columnLength(query, table, column) !== undefined
}

export async function hasTable (query: Query, table: string): Promise<boolean> {
  const rows = await query('SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?', [table])
  return rows.length > 0
}

/**
 * The refusal (409) of a change that needs what only `npm run migrate` adds (`what`: a table or a
 * column) on a database it has not touched yet: the operator's to run, not a fault of the gateway.
 */
export function notMigrated (what: string): GatewayError {
  return new GatewayError(409, `this database has no ${what} yet: run npm run migrate`)
}

/** MySQL/MariaDB error number meaning the column exists already (another replica got there first). */
const ER_DUP_FIELDNAME = 1060

async function hasIndex (query: Query, table: string, index: string): Promise<boolean> {
  const rows = await query(
    'SELECT 1 FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME = ?',
    [table, index]
  )
  return rows.length > 0
}

async function createIndex (query: Query, table: string, index: string, sql: string): Promise<void> {
  if (await hasIndex(query, table, index)) return
  try {
    await query(sql)
  } catch (err) {
    if ((err as { errno?: number }).errno !== ER_DUP_KEYNAME) throw err
  }
}

export const MIGRATIONS: readonly Migration[] = [
  {
    // The original VARCHAR(15) holds only IPv4; host names and IPv6 need more.
    name: '001-widen-computers-ip-addr',
    async up (query) {
      const len = await columnLength(query, 'computers', 'ip_addr')
      if (len === undefined) throw new Error('column computers.ip_addr is missing')
      if (len >= 255) return // never narrow a column someone already widened
      await query('ALTER TABLE computers MODIFY ip_addr VARCHAR(255) NOT NULL')
    }
  },
  {
    // The original looks assignments up by model name.
    name: '002-index-assignments-model-name',
    async up (query) {
      await createIndex(query, 'assignments', 'idx_assignments_model_name',
        'CREATE INDEX idx_assignments_model_name ON assignments (model_name)')
    }
  },
  {
    // Parallel slots per assignment (OLLAMA_NUM_PARALLEL); NULL or < 1 means 1. The original ignores it.
    name: '003-assignments-max-parallel',
    async up (query) {
      if (await hasColumn(query, 'assignments', 'max_parallel')) return
      try {
        await query('ALTER TABLE assignments ADD COLUMN max_parallel INT NULL')
      } catch (err) {
        if ((err as { errno?: number }).errno !== ER_DUP_FIELDNAME) throw err
      }
    }
  },
  {
    // The gateway's own API keys (CONTRACT 12.3): the secret is never stored, only its SHA-256.
    name: '004-create-api-keys',
    async up (query) {
      await query(CREATE_API_KEYS_TABLE)
    }
  },
  {
    // Drained assignments (POST /admin/assignments/:id/drain) take no new lease; a table of the
    // gateway's own, so the original tables keep their meaning for the original services.
    name: '005-assignment-drains',
    async up (query) {
      await query(`CREATE TABLE IF NOT EXISTS maestro_assignment_drains (
  assignment_id INT NOT NULL,
  drained_at    TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  PRIMARY KEY (assignment_id),
  FOREIGN KEY (assignment_id) REFERENCES assignments (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`)
    }
  },
  {
    // Usage per hour, client, model and assignment (CONTRACT 17), and the roll-up batches applied
    // to it (services/usage/usage-rollup.ts: a batch's id is inserted with its rows, so a second
    // apply adds nothing). Names are bytes (UTF-8): compared exactly, case and trailing spaces kept.
    name: '006-usage-hourly',
    async up (query) {
      await query(CREATE_USAGE_HOURLY_TABLE)
      await query(CREATE_USAGE_ROLLUPS_TABLE)
    }
  },
  {
    // Model aliases and fallbacks (CONTRACT 17). No foreign keys: a model lives in one of three
    // tables (llms, diffusors, speech_models); the admin API checks the names when they are written.
    name: '007-model-aliases-fallbacks',
    async up (query) {
      await query(CREATE_MODEL_ALIASES_TABLE)
      await query(CREATE_MODEL_FALLBACKS_TABLE)
    }
  },
  {
    // A key's token budgets (CONTRACT 17): prompt + output tokens a UTC day / month, NULL: none.
    name: '008-api-keys-token-budgets',
    async up (query) {
      for (const column of ['tokens_per_day', 'tokens_per_month']) {
        if (await hasColumn(query, 'api_keys', column)) continue
        try {
          await query(`ALTER TABLE api_keys ADD COLUMN ${column} BIGINT NULL`)
        } catch (err) {
          if ((err as { errno?: number }).errno !== ER_DUP_FIELDNAME) throw err
        }
      }
    }
  }
]

/**
 * Applies every migration not yet recorded in `maestro_migrations`, in order, and returns the
 * names of those it applied (none when the database is up to date).
 */
export async function migrate (query: Query, migrations: readonly Migration[] = MIGRATIONS): Promise<string[]> {
  const [db] = await query('SELECT DATABASE() AS name')
  if (db?.name === null || db?.name === undefined) throw new Error('no database selected: name one in the connection URL')
  const present = await query(
    'SELECT TABLE_NAME AS name FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()'
  )
  const tables = new Set(present.map(r => String(r.name).toLowerCase()))
  const missing = ORIGINAL_TABLES.filter(t => !tables.has(t))
  if (missing.length > 0) {
    throw new Error(`database ${String(db.name)} lacks the original ai-maestro tables (${missing.join(', ')}): ` +
      'create them first with docker/initdb/01-original-schema.sql')
  }

  await query(CREATE_MIGRATIONS_TABLE)
  const done = new Set((await query('SELECT name FROM maestro_migrations')).map(r => String(r.name)))
  const applied: string[] = []
  for (const m of migrations) {
    if (done.has(m.name)) continue
    await m.up(query)
    const result: any = await query('INSERT IGNORE INTO maestro_migrations (name) VALUES (?)', [m.name])
    // a concurrent run may have recorded it in the meantime: then it is that run's to report
    if (result?.affectedRows === undefined || result.affectedRows > 0) applied.push(m.name)
  }
  return applied
}
