import t from 'tap'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { loadInventoryFromDatabase, type Query } from '../services/fleet/inventory.js'
import { MIGRATIONS, migrate } from '../services/fleet/migrations.js'
import { createTestDatabase, seedInventory } from './helpers/database.js'
import { TS_LOADER } from './helpers/ts-loader.js'

const ALL = MIGRATIONS.map(m => m.name)

interface Column { table: string, column: string, type: string, nullable: string, default: unknown, collation: unknown }

async function columns (query: Query): Promise<Column[]> {
  const rows = await query(
    'SELECT TABLE_NAME AS `table`, COLUMN_NAME AS `column`, COLUMN_TYPE AS type, IS_NULLABLE AS nullable, ' +
    'COLUMN_DEFAULT AS `default`, COLLATION_NAME AS collation FROM information_schema.COLUMNS ' +
    'WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, ORDINAL_POSITION'
  )
  return rows.map(r => ({ ...r }))
}

async function indexes (query: Query): Promise<string[]> {
  const rows = await query(
    'SELECT TABLE_NAME AS t, INDEX_NAME AS i, COLUMN_NAME AS c, SEQ_IN_INDEX AS s FROM information_schema.STATISTICS ' +
    'WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX'
  )
  return rows.map(r => `${r.t}.${r.i}.${r.s}.${r.c}`)
}

const fleet = {
  computers: [{ name: 'box', ip: '127.0.0.1' }, { name: 'other', ip: '10.1.2.3' }],
  gpus: [{ weight: 1 }, { computer: 1, weight: 2 }, { computer: 1 }],
  llms: ['llama3', 'm-small'],
  diffusors: ['sd'],
  assignments: [
    { name: 'a', model: 'llama3', port: 11434, gpus: [1] },
    { name: 'b', model: 'llama3', port: 11434, gpus: [2, 3] },
    { name: 'c', model: 'sd', port: 8000, gpus: [3] }
  ]
}

t.test('original schema → migrate applies everything once', async t => {
  const db = await createTestDatabase(t)
  await seedInventory(db.query, fleet)
  const before = await columns(db.query)
  const inventoryBefore = await loadInventoryFromDatabase(db.query)

  t.same(await migrate(db.query), ALL, 'first run applies every migration')
  t.same(ALL, ['001-widen-computers-ip-addr', '002-index-assignments-model-name', '003-assignments-max-parallel', '004-create-api-keys', '005-assignment-drains', '006-usage-hourly', '007-model-aliases-fallbacks', '008-api-keys-token-budgets'])

  const after = await columns(db.query)
  const afterIndexes = await indexes(db.query)
  for (const col of before) {
    const now = after.find(c => c.table === col.table && c.column === col.column)
    if (col.table === 'computers' && col.column === 'ip_addr') {
      t.same(now, { ...col, type: 'varchar(255)' }, 'computers.ip_addr widened, otherwise unchanged')
    } else {
      t.same(now, col, `${col.table}.${col.column} unchanged`)
    }
  }
  const gatewayTables = ['maestro_migrations', 'api_keys', 'maestro_assignment_drains', 'maestro_usage_hourly', 'maestro_usage_rollups', 'maestro_model_aliases', 'maestro_model_fallbacks']
  t.same(after.filter(c => !gatewayTables.includes(c.table) && !(c.table === 'assignments' && c.column === 'max_parallel')).length, before.length,
    'no column added to the original tables but assignments.max_parallel')
  t.same(after.filter(c => c.table === 'api_keys').map(c => c.column),
    ['id', 'name', 'secret_sha256', 'priority', 'max_concurrent', 'max_queued', 'rpm', 'models', 'created_at', 'revoked_at', 'tokens_per_day', 'tokens_per_month'], 'api_keys created, with its budget columns (008)')
  t.ok(afterIndexes.includes('api_keys.uq_api_keys_name.1.name'), 'key names are unique')
  t.match(after.find(c => c.table === 'assignments' && c.column === 'max_parallel'), { type: /^int/, nullable: 'YES' }, 'max_parallel INT NULL')
  t.ok(afterIndexes.includes('assignments.idx_assignments_model_name.1.model_name'))
  t.same(await loadInventoryFromDatabase(db.query), inventoryBefore, 'inventory loads identically after migrating')

  const recorded = await db.query('SELECT name, applied_at FROM maestro_migrations ORDER BY name')
  t.same(recorded.map(r => r.name), ALL)
  t.ok(recorded.every(r => r.applied_at instanceof Date))

  t.same(await migrate(db.query), [], 'second run applies nothing')
  t.same(await columns(db.query), after, 'and changes no column')
  t.same(await indexes(db.query), afterIndexes, 'nor any index')
  t.same(await loadInventoryFromDatabase(db.query), inventoryBefore)

  const long = 'gpu-server-17.rack-4.datacenter.example.com'
  await seedInventory(db.query, {
    computers: [{ id: 50, name: 'v6', ip: '2001:db8:85a3::8a2e:370:7334' }, { id: 51, name: 'named', ip: long }],
    gpus: [{ id: 50, computer: 0 }, { id: 51, computer: 1 }],
    assignments: [{ id: 50, model: 'm-small', port: 11434, gpus: [50] }, { id: 51, model: 'm-small', port: 11434, gpus: [51] }]
  })
  const inv = await loadInventoryFromDatabase(db.query)
  t.same(inv.assignments.filter(a => a.model === 'm-small').map(a => a.url),
    ['http://[2001:db8:85a3::8a2e:370:7334]:11434', `http://${long}:11434`], 'long host names and IPv6 now fit')
})

t.test('concurrent runs do not fail and apply each migration once', async t => {
  const db = await createTestDatabase(t)
  const [a, b] = await Promise.all([migrate(db.query), migrate(db.query)])
  t.same([...a, ...b].sort(), ALL, 'between them, each migration reported once')
  t.same(await migrate(db.query), [])
})

t.test('a column someone already widened is never narrowed', async t => {
  const db = await createTestDatabase(t)
  await db.query('ALTER TABLE computers MODIFY ip_addr VARCHAR(300) NOT NULL')
  t.same(await migrate(db.query), ALL)
  const [col] = await db.query(
    "SELECT COLUMN_TYPE AS type FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'computers' AND COLUMN_NAME = 'ip_addr'"
  )
  t.equal(col.type, 'varchar(300)')
})

t.test('work already done by hand is recorded, not redone', async t => {
  const db = await createTestDatabase(t)
  await db.query('CREATE INDEX idx_assignments_model_name ON assignments (model_name)')
  t.same(await migrate(db.query), ALL)
  t.same(await migrate(db.query), [])
})

t.test('a database without the original tables is refused', async t => {
  const db = await createTestDatabase(t)
  await db.query('DROP TABLE assignment_gpus')
  await t.rejects(migrate(db.query), /lacks the original ai-maestro tables \(assignment_gpus\): create them first/)
})

/* ------------------------------------------------------------------------------------------ */

const SCRIPT = fileURLToPath(new URL('../scripts/migrate.ts', import.meta.url))

/** Runs scripts/migrate.ts with the TypeScript loader this test runs under. */
async function runCli (env: Record<string, string>): Promise<{ code: number | null, stdout: string, stderr: string }> {
  const clean = { ...process.env }
  delete clean.MARIADB_URL
  delete clean.ConnectionStrings__MariaDb
  const child = spawn(process.execPath, [...TS_LOADER, SCRIPT], { env: { ...clean, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (d: Buffer) => { stdout += d.toString() })
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString() })
  const code = await new Promise<number | null>(resolve => child.on('close', resolve))
  return { code, stdout, stderr }
}

t.test('npm run migrate (scripts/migrate.ts)', async t => {
  const db = await createTestDatabase(t)
  let r = await runCli({ MARIADB_URL: db.url })
  t.equal(r.code, 0, r.stderr)
  t.equal(r.stdout, ALL.map(n => `applied ${n}\n`).join(''), 'one line per applied migration')

  r = await runCli({ MARIADB_URL: db.url })
  t.equal(r.code, 0)
  t.equal(r.stdout, '', 'nothing to apply, nothing printed')

  const url = new URL(db.url)
  const db2 = await createTestDatabase(t)
  r = await runCli({
    MARIADB_URL: '',
    ConnectionStrings__MariaDb: `server=${url.hostname};PORT=${url.port === '' ? 3306 : url.port};Database=${db2.name};Uid=${decodeURIComponent(url.username)};Pwd=${decodeURIComponent(url.password)};SslMode=None;`
  })
  t.equal(r.code, 0, r.stderr)
  t.equal(r.stdout.split('\n').filter(Boolean).length, ALL.length, 'the legacy connection string works when MARIADB_URL is empty')

  r = await runCli({})
  t.equal(r.code, 1)
  t.equal(r.stderr, 'migrate failed: MARIADB_URL (or ConnectionStrings__MariaDb) is not set\n')

  r = await runCli({ ConnectionStrings__MariaDb: 'Server=;Database=x' })
  t.equal(r.code, 1)
  t.equal(r.stderr, 'migrate failed: ConnectionStrings__MariaDb: connection string names no Server\n')

  r = await runCli({ MARIADB_URL: 'mysql://root@127.0.0.1:1/nope' })
  t.equal(r.code, 1)
  t.match(r.stderr, /^migrate failed: .*ECONNREFUSED.*\n$/)
  t.equal(r.stderr.split('\n').length, 2, 'one line')
})
