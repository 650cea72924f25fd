// pgjdbc through pgveil: statement reuse past the prepare threshold, fetch-size portals,
// batches, metadata calls, scrollable result sets and COPY. Prints one line per result so
// the test can compare runs (exempt through pgveil against direct) and look for clear
// values (masked role).
//
//     java -cp .:postgresql.jar Drivers JDBC_URL USER PASSWORD

import java.io.StringWriter;
import java.sql.*;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class Drivers {
    static void print(String label, ResultSet rs) throws SQLException {
        StringBuilder b = new StringBuilder(label).append(":");
        int n = rs.getMetaData().getColumnCount();
        while (rs.next()) {
            b.append(" [");
            for (int i = 1; i <= n; i++) {
                if (i > 1) b.append("|");
                b.append(rs.getString(i));
            }
            b.append("]");
        }
        System.out.println(b);
    }

    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0], args[1], args[2])) {
            // The sixth execution on runs a server-prepared statement: Bind/Execute only.
            try (PreparedStatement ps =
                    c.prepareStatement("SELECT id, phone, email FROM customers WHERE id = ?")) {
                for (int i = 1; i <= 10; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        print("reuse " + i, rs);
                    }
                }
            }
            // A fetch size makes a portal fetched in parts (inside a transaction).
            c.setAutoCommit(false);
            for (int round = 1; round <= 7; round++) {
                try (PreparedStatement ps = c.prepareStatement(
                        "SELECT id, phone FROM customers WHERE id <= ? ORDER BY id")) {
                    ps.setFetchSize(3);
                    ps.setInt(1, 8);
                    try (ResultSet rs = ps.executeQuery()) {
                        print("fetch-size " + round, rs);
                    }
                }
            }
            // A batch, rolled back.
            try (PreparedStatement ps =
                    c.prepareStatement("INSERT INTO tasks (owner, note) VALUES (?, ?)")) {
                for (int i = 0; i < 3; i++) {
                    ps.setString(1, "alice");
                    ps.setString(2, "batch " + i);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                System.out.println("batch: " + counts.length + " statements");
            }
            c.rollback();
            c.setAutoCommit(true);
            // Metadata calls.
            DatabaseMetaData md = c.getMetaData();
            try (ResultSet rs = md.getPrimaryKeys(null, "public", "customers")) {
                StringBuilder b = new StringBuilder("primary keys:");
                while (rs.next()) b.append(" ").append(rs.getString("COLUMN_NAME"));
                System.out.println(b);
            }
            try (ResultSet rs = md.getIndexInfo(null, "public", "customers", false, false)) {
                StringBuilder b = new StringBuilder("indexes:");
                while (rs.next()) b.append(" ").append(rs.getString("INDEX_NAME"));
                System.out.println(b);
            }
            try (ResultSet rs = md.getColumns(null, "public", "customers", "%")) {
                StringBuilder b = new StringBuilder("columns:");
                while (rs.next()) b.append(" ").append(rs.getString("COLUMN_NAME"));
                System.out.println(b);
            }
            // A scrollable result set.
            try (Statement st = c.createStatement(
                    ResultSet.TYPE_SCROLL_INSENSITIVE, ResultSet.CONCUR_READ_ONLY);
                 ResultSet rs = st.executeQuery(
                    "SELECT id, phone FROM customers ORDER BY id LIMIT 5")) {
                rs.last();
                String last = rs.getString(1) + "|" + rs.getString(2);
                rs.absolute(2);
                System.out.println("scroll: last " + last + " second " + rs.getString(1) + "|"
                        + rs.getString(2));
            }
            // COPY out.
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            StringWriter w = new StringWriter();
            copy.copyOut(
                "COPY (SELECT id, phone, email FROM customers ORDER BY id LIMIT 3) TO STDOUT", w);
            System.out.println("copy: " + w.toString().replace("\n", " / "));
        }
    }
}
