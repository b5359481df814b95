import { execFileSync } from 'node:child_process'
import { readdirSync, statSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { chromium, errors, type BrowserContext, type Locator } from 'playwright-core'
import { packageRoot } from '../../services/config/package-root.js'

/** Debian's Chromium (`.ci/run` installs it when missing); nothing is downloaded. */
export const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'

const UI_CONFIG = join(packageRoot, 'tsconfig.ui.json')

/** Newest (`pick` Math.max) or oldest (Math.min) modification time of the files below `dir` ending in `suffix`. */
function mtimeOf (dir: string, suffix: string, pick: (...n: number[]) => number): number {
  let files: string[]
  try {
    files = readdirSync(dir, { recursive: true, encoding: 'utf8' }).filter((f) => f.endsWith(suffix))
  } catch {
    return NaN
  }
  return files.length === 0 ? NaN : pick(...files.map((f) => statSync(join(dir, f)).mtimeMs))
}

/**
 * The console's scripts as `npm run build` compiles them (`tsconfig.ui.json` into `dist/ui/`, which
 * the gateway serves), compiled unless every output is newer than every source: `npm test`'s type
 * check has already compiled them, so the console's test files do not each run the compiler again
 * (nor write the same files at the same time); a file run alone after an edit still gets them fresh.
 */
export function buildConsole (): void {
  const newestSource = Math.max(mtimeOf(join(packageRoot, 'ui'), '.ts', Math.max), statSync(UI_CONFIG).mtimeMs)
  const oldestOutput = mtimeOf(join(packageRoot, 'dist', 'ui'), '.js', Math.min)
  if (oldestOutput > newestSource) return
  const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc')
  execFileSync(process.execPath, [tsc, '-p', UI_CONFIG], { stdio: 'inherit' })
}

/**
 * A headless Chromium with a fresh profile, closed (and its profile removed) at the end of the
 * test. The flags keep it from calling any host of its own (updates, sync, field trials).
 */
export async function startBrowser (t: { teardown: (fn: () => unknown) => void }): Promise<BrowserContext> {
  const profile = await mkdtemp(join(tmpdir(), 'maestro-chromium-'))
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage'],
    viewport: { width: 1400, height: 900 }
  })
  t.teardown(async () => {
    await context.close()
    await rm(profile, { recursive: true, force: true })
  })
  return context
}

/**
 * `locator`'s text once it matches `pattern` (Playwright polls the page for it), or as it is when
 * `ms` have passed: the caller asserts on it, so a state that never comes fails that assertion,
 * with its own message, instead of a timeout. For a read right after an action whose effect the
 * page draws a moment later.
 */
export async function textWhenMatching (locator: Locator, pattern: RegExp | string, ms = 3000): Promise<string> {
  try {
    await locator.filter({ hasText: pattern }).first().waitFor({ timeout: ms })
  } catch (err) {
    if (!(err instanceof errors.TimeoutError)) throw err
  }
  return await locator.textContent() ?? ''
}
