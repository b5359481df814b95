/**
 * `npm run migrate`: applies the gateway's migrations (services/fleet/migrations.ts) to the inventory
 * database named by MARIADB_URL, or by the legacy ConnectionStrings__MariaDb.
 * Prints one line per migration applied; on failure one line on stderr and exit code 1.
 */
import mysql from 'mysql2/promise'
import { mariaDbUrlFromEnv } from '../services/config/connection-strings.js'
import { migrate } from '../services/fleet/migrations.js'

function oneLine (err: unknown): string {
  const e = err as { message?: unknown, code?: unknown }
  const code = typeof e?.code === 'string' ? e.code : ''
  const message = typeof e?.message === 'string' && e.message !== '' ? e.message : code !== '' ? code : String(err)
  const suffix = code !== '' && !message.includes(code) ? ` (${code})` : ''
  return (message + suffix).replace(/\s*\n\s*/g, ' ')
}

async function main (): Promise<void> {
  const url = mariaDbUrlFromEnv(process.env)
  if (url === undefined) throw new Error('MARIADB_URL (or ConnectionStrings__MariaDb) is not set')
  const connection = await mysql.createConnection(url)
  try {
    const applied = await migrate(async (sql, params) => {
      const [rows] = await connection.query(sql, params)
      return rows as any[]
    })
    for (const name of applied) console.log(`applied ${name}`)
  } finally {
    await connection.end()
  }
}

main().catch((err: unknown) => {
  console.error(`migrate failed: ${oneLine(err)}`)
  process.exitCode = 1
})
