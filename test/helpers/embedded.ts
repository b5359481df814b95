/**
 * Embedded mode for tests: an inventory file naming simulators, and a gateway started with no
 * MariaDB and no Redis (inventory from the file, leases in memory).
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import type { MaestroOptions } from '../../app.js'
import { startGateway, type Gateway } from './gateway.js'

type Teardown = Pick<Test, 'teardown'>

export interface FileUpstream {
  name: string
  model: string
  kind?: 'llm' | 'diffusor' | 'speech'
  port: number
  /** GPU ids (numbers in the file); each one is created once */
  gpus: number[]
}

/** The variables that would take the gateway out of embedded mode. */
export const SERVICE_VARIABLES = ['MARIADB_URL', 'ConnectionStrings__MariaDb', 'REDIS_URL', 'ConnectionStrings__Redis'] as const

/** The environment without the service variables (for a child process in embedded mode). */
export function embeddedEnv (extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra }
  for (const v of SERVICE_VARIABLES) delete env[v]
  return env
}

/** Writes an inventory file (the embedded-mode format) for upstreams on 127.0.0.1; removed after the test. */
export async function writeInventoryFile (t: Teardown, upstreams: FileUpstream[]): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'maestro-inventory-'))
  t.teardown(async () => { await rm(dir, { recursive: true, force: true }) })
  const gpus = [...new Set(upstreams.flatMap((u) => u.gpus))]
  const inventory = {
    computers: [{ id: 1, name: 'localhost', ip: '127.0.0.1' }],
    gpus: gpus.map((id) => ({ id, computer: 1, name: `GPU ${id}`, weight: 1 })),
    assignments: upstreams.map((u, i) => ({ id: i + 1, name: u.name, model: u.model, kind: u.kind ?? 'llm', port: u.port, gpus: u.gpus }))
  }
  const file = join(dir, 'inventory.json')
  await writeFile(file, JSON.stringify(inventory, null, 2))
  return file
}

/** A gateway in embedded mode: the service variables of the environment are hidden while it starts. */
export async function startEmbeddedGateway (t: Teardown, options: MaestroOptions): Promise<Gateway> {
  const saved = SERVICE_VARIABLES.map((v) => [v, process.env[v]] as const)
  for (const v of SERVICE_VARIABLES) delete process.env[v]
  try {
    return await startGateway(t, options)
  } finally {
    for (const [v, value] of saved) if (value !== undefined) process.env[v] = value
  }
}
