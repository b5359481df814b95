/** The built server (dist/) for tests that run it as a child process. */
import { execFile } from 'node:child_process'
import { readdir, stat } from 'node:fs/promises'
import { performance } from 'node:perf_hooks'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

export const ROOT = fileURLToPath(new URL('../..', import.meta.url))

/** `npm run build`, unless dist/server.js is newer than every source and config file it comes from. */
export async function buildIfStale (): Promise<string> {
  const built = await stat(`${ROOT}dist/server.js`).then((s) => s.mtimeMs, () => 0)
  const skip = new Set(['node_modules', 'dist', 'test', 'bench'])
  const newerThanBuild = async (dir: string): Promise<boolean> => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = `${dir}${entry.name}`
      if (entry.isDirectory()) {
        if (!skip.has(entry.name) && !entry.name.startsWith('.') && await newerThanBuild(path + '/')) return true
      } else if (/(\.ts|\.lua|tsconfig.*\.json|package\.json)$/.test(entry.name) && (await stat(path)).mtimeMs > built) {
        return true
      }
    }
    return false
  }
  if (built > 0 && !await newerThanBuild(ROOT)) return 'dist/ is up to date'
  const started = performance.now()
  await promisify(execFile)('npm', ['run', 'build'], { cwd: ROOT })
  return `npm run build took ${Math.round(performance.now() - started)} ms`
}
