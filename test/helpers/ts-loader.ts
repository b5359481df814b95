import { fileURLToPath } from 'node:url'

/**
 * Node flags that run a `.ts` entry point in a child process the way tap runs the tests (the tsx
 * loader, no type check), whatever the child's working directory.
 */
export const TS_LOADER: string[] = [`--import=${import.meta.resolve('tsx')}`, '--enable-source-maps']

/** The standalone server's entry point, for tests that run it as a process of its own (with TS_LOADER). */
export const SERVER = fileURLToPath(new URL('../../server.ts', import.meta.url))
